"""Synthetic AdvertiseGen-shaped demo data.

Each record pairs a ``content`` string (``类型#连衣裙*颜色#红色*...``) with a
``summary`` of ad copy. The summary is a learnable function of the content:
every attribute is rendered through one of a few phrase templates that quote
its value, in the order the attributes appear in the content; short ones get
a generic closing sentence, and each ends with a recap naming the garment again
(with its colour/pattern/style), which teaches a pre-trained base to copy
earlier words. All vocabulary and phrasing here is original text written for
this project.

Regenerate the shipped files with ``python -m runner.data.demo --out data/adgen-demo``.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Attribute order used both in the content string and in the summary.
KEY_ORDER: tuple[str, ...] = (
    "版型",
    "材质",
    "颜色",
    "风格",
    "图案",
    "领型",
    "袖长",
    "袖型",
    "衣长",
    "衣门襟",
    "裙长",
    "裙型",
    "裤长",
    "裤型",
    "裤腰型",
    "衣款式",
    "裙款式",
    "裤款式",
)

# Default value pools per attribute key.
VALUES: dict[str, tuple[str, ...]] = {
    "版型": ("宽松", "修身", "显瘦", "直筒", "标准"),
    "材质": ("棉", "雪纺", "真丝", "针织", "亚麻", "蕾丝", "聚酯纤维", "丝绒"),
    "颜色": (
        "红色",
        "白色",
        "黑色",
        "蓝色",
        "粉色",
        "绿色",
        "黄色",
        "灰色",
        "卡其色",
        "杏色",
        "酒红色",
        "藏青色",
        "米白色",
        "紫色",
        "驼色",
    ),
    "风格": (
        "复古",
        "简约",
        "甜美",
        "休闲",
        "通勤",
        "街头",
        "文艺",
        "淑女",
        "学院",
        "清新",
        "优雅",
    ),
    "图案": ("碎花", "条纹", "格子", "纯色", "波点", "印花", "字母", "刺绣", "拼色", "线条"),
    "领型": ("圆领", "V领", "翻领", "立领", "娃娃领", "方领", "一字领"),
    "袖长": ("短袖", "长袖", "七分袖", "无袖", "五分袖"),
    "袖型": ("泡泡袖", "灯笼袖", "喇叭袖", "蝙蝠袖", "落肩袖", "荷叶袖"),
    "衣长": ("短款", "中长款", "长款", "常规款"),
    "衣门襟": ("拉链", "单排扣", "双排扣", "系带", "暗扣"),
    "裙长": ("短裙", "中长裙", "长裙", "超短裙"),
    "裙型": ("A字裙", "百褶裙", "包臀裙", "鱼尾裙", "蛋糕裙", "直筒裙"),
    "裤长": ("九分裤", "七分裤", "长裤", "短裤", "五分裤"),
    "裤型": ("阔腿裤", "直筒裤", "小脚裤", "哈伦裤", "喇叭裤", "背带裤"),
    "裤腰型": ("高腰", "中腰", "松紧腰", "低腰"),
    "衣款式": ("口袋", "拼接", "纽扣", "荷叶边", "系带", "抽绳", "露肩", "蝴蝶结"),
    "裙款式": ("收腰", "荷叶边", "系带", "拼接", "开叉", "褶皱", "木耳边", "纽扣"),
    "裤款式": ("口袋", "破洞", "拉链", "抽绳", "纽扣", "毛边", "拼接"),
}

# Phrase templates per key; ``{v}`` is the attribute value.
PHRASES: dict[str, tuple[str, ...]] = {
    "版型": ("{v}的版型设计，穿上身后非常有型", "采用{v}剪裁，巧妙修饰身形"),
    "材质": (
        "采用{v}材质打造，触感柔软亲肤",
        "{v}面料透气舒适，贴身穿着也很自在",
        "精选{v}材质，垂坠感好且不易起皱",
    ),
    "颜色": (
        "{v}的颜色十分养眼，衬得肤色白皙透亮",
        "选用{v}作为主色调，低调中透着高级感",
        "一抹{v}温柔又耐看，怎么搭都不出错",
    ),
    "风格": (
        "整体走{v}风路线，彰显独特的个人品味",
        "带着浓浓的{v}气息，轻松穿出好气质",
        "{v}的设计风格，日常出街十分吸睛",
    ),
    "图案": (
        "点缀{v}图案，增添几分灵动趣味",
        "{v}元素的运用，让整体造型更加丰富",
        "经典的{v}图案，透出满满的活力",
    ),
    "领型": (
        "{v}设计修饰脸型，衬出优美的颈部线条",
        "精致的{v}，凸显女性的柔美气质",
        "别致的{v}剪裁，为造型增添亮点",
    ),
    "袖长": (
        "{v}的长度刚刚好，活动起来轻松自如",
        "利落的{v}设计，适合多种场合穿着",
        "{v}款式巧妙修饰手臂线条",
    ),
    "袖型": ("{v}的设计俏皮可爱，凸显甜美减龄感", "独特的{v}，巧妙遮住手臂的肉肉"),
    "衣长": ("{v}的衣长设计，轻松打造高挑身材", "{v}的长度，搭配下装更显比例"),
    "衣门襟": ("{v}门襟设计，穿脱方便又实用", "前襟采用{v}设计，简洁利落"),
    "裙长": ("{v}的长度恰到好处，展现纤长美腿", "{v}设计行走间摇曳生姿，尽显优雅"),
    "裙型": ("{v}的廓形遮肉显瘦，小个子也能驾驭", "经典的{v}版型，灵动又不失端庄"),
    "裤长": ("{v}的长度恰好，显高又显瘦", "{v}设计让双腿看起来更加修长"),
    "裤型": ("{v}的版型遮住腿部小缺点，走路带风", "经典{v}造型，穿出利落帅气感"),
    "裤腰型": ("{v}设计提升腰线，打造黄金比例", "{v}的腰头贴合身形，穿着舒适不勒"),
    "衣款式": (
        "{v}的细节设计独具匠心，提升整体质感",
        "加入{v}元素点缀，让单品更有看点",
        "{v}设计别出心裁，打破单调感",
    ),
    "裙款式": (
        "{v}的细节设计独具匠心，提升整体质感",
        "加入{v}元素点缀，让裙身更有看点",
        "{v}设计别出心裁，打破单调感",
    ),
    "裤款式": (
        "{v}的细节设计独具匠心，提升整体质感",
        "加入{v}元素点缀，让裤子更有看点",
        "{v}设计别出心裁，打破单调感",
    ),
}

CLOSINGS: tuple[str, ...] = (
    "无论是日常通勤还是周末出游都很合适。",
    "轻松穿出时髦又自在的感觉。",
    "百搭又实用，值得入手。",
    "搭配一双小白鞋就很有范儿。",
    "让你在人群中脱颖而出。",
    "是这个季节不可错过的好物。",
    "穿上它尽情展现自信与魅力。",
    "简单搭配就能轻松出街。",
    "是同类单品中难得的好选择。",
)

# A closing recap repeats the garment (and its colour/pattern/style when given):
# copying earlier words is a skill the pre-trained base then brings to fine-tuning.
RECAPS: tuple[str, ...] = (
    "{adj}{t}一定会成为你衣橱里的心头好。",
    "喜欢{adj}{t}的你千万不要错过。",
    "这{m}{adj}{t}值得拥有。",
)
RECAP_KEYS: tuple[str, ...] = ("颜色", "图案", "风格")

BRAND = "BRAND"
BRAND_RATE = 0.05
TEMPLATE_NOISE = 0.15
# Number of extra attributes besides 类型 and how often each count is drawn.
ATTR_COUNTS: tuple[int, ...] = (3, 4, 5, 6, 7)
ATTR_WEIGHTS: tuple[float, ...] = (0.15, 0.3, 0.3, 0.15, 0.1)
CLOSING_BELOW = 90

DRESS_KEYS = (
    "版型",
    "材质",
    "颜色",
    "风格",
    "图案",
    "领型",
    "袖长",
    "袖型",
    "裙长",
    "裙型",
    "裙款式",
)
SKIRT_KEYS = ("版型", "材质", "颜色", "风格", "图案", "裙长", "裙型", "裙款式")
TOP_KEYS = ("版型", "材质", "颜色", "风格", "图案", "领型", "袖长", "袖型", "衣长", "衣款式")
OUTER_KEYS = ("版型", "材质", "颜色", "风格", "图案", "领型", "袖长", "衣长", "衣门襟", "衣款式")
PANTS_KEYS = ("版型", "材质", "颜色", "风格", "图案", "裤长", "裤型", "裤腰型", "裤款式")


@dataclass(frozen=True)
class Garment:
    """A garment type, the attribute keys it accepts and value overrides."""

    name: str
    measure: str
    keys: tuple[str, ...]
    overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def values_for(self, key: str) -> tuple[str, ...]:
        return self.overrides.get(key, VALUES[key])


GARMENTS: tuple[Garment, ...] = (
    Garment("裙", "条", DRESS_KEYS),
    Garment("连衣裙", "条", DRESS_KEYS),
    Garment("半身裙", "条", SKIRT_KEYS),
    Garment("上衣", "件", TOP_KEYS),
    Garment(
        "衬衫",
        "件",
        (*TOP_KEYS, "衣门襟"),
        {
            "材质": ("棉", "雪纺", "真丝", "亚麻", "聚酯纤维"),
            "领型": ("翻领", "立领", "方领", "V领", "娃娃领"),
            "衣门襟": ("单排扣", "暗扣", "系带"),
        },
    ),
    Garment(
        "T恤",
        "件",
        TOP_KEYS,
        {
            "材质": ("棉", "莫代尔", "聚酯纤维", "针织"),
            "领型": ("圆领", "V领", "翻领"),
            "袖长": ("短袖", "长袖", "五分袖"),
        },
    ),
    Garment(
        "卫衣",
        "件",
        TOP_KEYS,
        {"材质": ("棉", "针织", "聚酯纤维", "丝绒"), "领型": ("圆领", "连帽", "立领")},
    ),
    Garment(
        "毛衣",
        "件",
        TOP_KEYS,
        {"材质": ("羊毛", "针织", "马海毛", "羊绒"), "领型": ("高领", "圆领", "V领", "半高领")},
    ),
    Garment(
        "外套",
        "件",
        OUTER_KEYS,
        {
            "材质": ("羊毛", "棉", "牛仔布", "灯芯绒", "聚酯纤维", "皮革"),
            "领型": ("翻领", "立领", "连帽", "西装领"),
            "袖长": ("长袖", "七分袖"),
        },
    ),
    Garment(
        "风衣",
        "件",
        OUTER_KEYS,
        {
            "材质": ("棉", "聚酯纤维"),
            "领型": ("翻领", "西装领", "立领"),
            "袖长": ("长袖",),
            "衣长": ("中长款", "长款"),
        },
    ),
    Garment(
        "夹克",
        "件",
        OUTER_KEYS,
        {
            "材质": ("牛仔布", "皮革", "聚酯纤维", "灯芯绒"),
            "领型": ("翻领", "立领", "连帽"),
            "袖长": ("长袖",),
            "衣长": ("短款", "常规款"),
        },
    ),
    Garment("裤", "条", PANTS_KEYS, {"材质": ("棉", "亚麻", "灯芯绒", "聚酯纤维", "针织")}),
    Garment("牛仔裤", "条", PANTS_KEYS, {"材质": ("牛仔布", "棉")}),
    Garment("休闲裤", "条", PANTS_KEYS, {"材质": ("棉", "亚麻", "聚酯纤维", "针织")}),
)

TRAIN_ROWS, TRAIN_SEED = 2000, 1
DEV_ROWS, DEV_SEED = 200, 2
PRETRAIN_ROWS, PRETRAIN_SEED = 3000, 3


def _pick_attributes(rng: random.Random, garment: Garment) -> list[tuple[str, str]]:
    count = rng.choices(ATTR_COUNTS, weights=ATTR_WEIGHTS)[0]
    keys = rng.sample(garment.keys, min(count, len(garment.keys)))
    keys.sort(key=KEY_ORDER.index)
    return [(key, rng.choice(garment.values_for(key))) for key in keys]


def _template_index(rng: random.Random, key: str, value: str) -> int:
    """Mostly a stable function of (key, value), sometimes a random variant."""
    n = len(PHRASES[key])
    if rng.random() < TEMPLATE_NOISE:
        return rng.randrange(n)
    return zlib.crc32(f"{key}#{value}".encode()) % n


def render_content(garment: Garment, attributes: Sequence[tuple[str, str]]) -> str:
    parts = [f"类型#{garment.name}"] + [f"{key}#{value}" for key, value in attributes]
    return "*".join(parts)


def render_summary(
    rng: random.Random, garment: Garment, attributes: Sequence[tuple[str, str]]
) -> str:
    prefix = f"{BRAND}家的" if rng.random() < BRAND_RATE else ""
    phrases = [PHRASES[k][_template_index(rng, k, v)].format(v=v) for k, v in attributes]
    text = f"{prefix}这{garment.measure}{garment.name}，" + "。".join(phrases) + "。"
    if len(text) < CLOSING_BELOW:
        text += rng.choice(CLOSINGS)
    return text + render_recap(rng, garment, attributes)


def render_recap(
    rng: random.Random, garment: Garment, attributes: Sequence[tuple[str, str]]
) -> str:
    adj = "".join(value for key, value in attributes if key in RECAP_KEYS)
    return rng.choice(RECAPS).format(adj=adj, t=garment.name, m=garment.measure)


def generate_record(rng: random.Random) -> dict[str, str]:
    garment = rng.choice(GARMENTS)
    attributes = _pick_attributes(rng, garment)
    return {
        "content": render_content(garment, attributes),
        "summary": render_summary(rng, garment, attributes),
    }


def generate_records(n: int, seed: int) -> list[dict[str, str]]:
    """Return ``n`` records ``{"content", "summary"}``, deterministic for ``seed``."""
    rng = random.Random(seed)
    return [generate_record(rng) for _ in range(n)]


def generate_pretrain_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Return ``n`` rows ``{"text": summary}``: ad copy without the attribute prompt."""
    return [{"text": record["summary"]} for record in generate_records(n, seed)]


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_demo_dataset(out_dir: str | Path) -> dict[str, int]:
    """Write train/dev/pretrain JSONL files into ``out_dir``; return row counts."""
    out = Path(out_dir)
    files = {
        "train.jsonl": generate_records(TRAIN_ROWS, TRAIN_SEED),
        "dev.jsonl": generate_records(DEV_ROWS, DEV_SEED),
        "pretrain.jsonl": generate_pretrain_rows(PRETRAIN_ROWS, PRETRAIN_SEED),
    }
    return write_files(out, files)


def write_files(out_dir: str | Path, files: Mapping[str, list[Any]]) -> dict[str, int]:
    """Each `files` entry (a relative path: its rows) as JSONL under `out_dir`; row counts."""
    for name, rows in files.items():
        write_jsonl(Path(out_dir) / name, rows)
    return {name: len(rows) for name, rows in files.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic AdvertiseGen demo data.")
    parser.add_argument("--out", default="data/adgen-demo", help="output directory")
    args = parser.parse_args(argv)
    for name, rows in write_demo_dataset(args.out).items():
        print(f"wrote {Path(args.out) / name} ({rows} rows)")


if __name__ == "__main__":
    main()
