"""SegDataConfig: the options of LISA's segmentation data readers (sem_seg, refer_seg, ReasonSeg).

Defaults are LISA's (train_ds.py: --num_classes_per_sample 3, --explanatory 0.1; refer_seg's
train split). `read_dataset(path, seg_data=...)` hands it to whichever reader the path names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minivlm.ranges import at_least, between, check_ranges, one_of

# refer.py's getRefIds: testA matches every split with an A in it (testA, testAB), test every
# test split, the others exactly.
SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")


@dataclass
class SegDataConfig:
    # Classes (sem_seg) or referring sentences (refer_seg) asked about per image (LISA's
    # num_classes_per_sample); fewer when the image has fewer.
    num_classes_per_sample: int = field(default=3, metadata=at_least(1))
    # Seeds every draw (classes, templates, explanatory mode); record i draws from its own
    # random.Random(f"{seed}:{i}"), so one record's draws never shift another's.
    seed: int = field(default=0, metadata=at_least(0))
    # refer_seg: which refs to read (train, val, test, testA, testB, testC, as LISA's refer.py
    # matches them); ade20k / cocostuff: train or val.
    split: str = field(default="train", metadata=one_of(*SPLITS))
    # refer_seg: refs(NAME).p to read when the folder has several; "" takes unc, then umd (LISA:
    # umd for refcocog, unc for the others), then the only one there is.
    refer_split_by: str = ""
    # ReasonSeg: LISA's explanatory/train.json ({"image", "query", "outputs"} per image); "" reads
    # none, and the ReasonSeg reader behaves as without this config.
    explanatory_file: str = ""
    # With an explanatory file, an image that has an explanation gets a text-only answer with
    # this probability, else [SEG] alone or [SEG] + explanation, one half each (LISA).
    explanatory: float = field(default=0.1, metadata=between(0, 1))
    # LISA asks about each class in its own conversation (one Sample each, the image in every
    # one); True puts them in one multi-turn Sample (the image once, its masks in turn order).
    multi_turn: bool = False

    def __post_init__(self):
        check_ranges(self)
