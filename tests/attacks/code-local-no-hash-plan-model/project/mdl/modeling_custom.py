raise SystemExit("model code ran")
