"""ShapesConfig: the sizes and counts of the synthetic shapes world (see shapes.py).

Its own file so that generate.py (the dataset as a whole) and writers.py (one split at a
time) can both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minivlm.data.shapes.scene import COLOURS, KINDS
from minivlm.ranges import at_least, between, check_ranges

MOST_SHAPES = len(KINDS) * len(COLOURS)  # no two shapes in a scene share colour and kind


@dataclass
class ShapesConfig:
    image_size: int = field(default=32, metadata=at_least(16))  # smaller leaves no room to draw
    min_shapes: int = field(default=1, metadata=between(1, MOST_SHAPES))
    max_shapes: int = field(default=4, metadata=between(1, MOST_SHAPES))
    # each is captioned in pretrain.json and questioned in sft.json
    num_train_images: int = field(default=3000, metadata=at_least(0))
    questions_per_image: int = field(default=4, metadata=at_least(0))  # SFT turns per train image
    num_train_pairs: int = field(default=600, metadata=at_least(0))  # two-image SFT records
    num_val: int = field(default=200, metadata=at_least(0))  # items in val.json
    num_test: int = field(default=400, metadata=at_least(0))  # items in eval.json
    num_seg_train: int = field(default=1500, metadata=at_least(0))
    num_seg_val: int = field(default=100, metadata=at_least(0))
    num_seg_test: int = field(default=200, metadata=at_least(0))
    jpeg_quality: int = field(default=95, metadata=between(1, 100))  # ReasonSeg's, as LISA's
    # Chiron-o1 writes its reasoning before "### The final answer is:"; a short, checkable
    # reasoning ("The red shapes: the red circle.") lets the LM bind colour to kind in text.
    # Closed SFT answers and the eval items' "reasoning" field get it; "describe" never does.
    reasoning: bool = False

    def __post_init__(self):
        check_ranges(self)
        if self.min_shapes > self.max_shapes:
            raise ValueError(f"ShapesConfig: min_shapes {self.min_shapes} is more than "
                             f"max_shapes {self.max_shapes}")

    @classmethod
    def quick(cls) -> ShapesConfig:
        """Tiny counts: a complete dataset in well under a second, for tests."""
        return cls(num_train_images=16, num_train_pairs=4, num_val=20, num_test=20,
                   num_seg_train=6, num_seg_val=3, num_seg_test=3)

    @property
    def size_range(self) -> tuple[int, int]:
        return round(0.25 * self.image_size), round(0.44 * self.image_size)  # 8..14 px at 32

    @property
    def gap(self) -> int:
        return max(1, self.image_size // 16)  # empty pixels between shapes
