"""Training: attempts (where a run starts, the refuse/restart policy; no torch), the training
loop the train stage and every launched worker run (loop.py), and the Trainer subclass that
holds every override of a library's behaviour (trainer.py, imports transformers)."""
