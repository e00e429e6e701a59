"""Data: the Sample unit, image loading, format readers and the synthetic shapes world."""

from .images import ImageError, image_size, load_image
from .readers import (polygons_to_mask, read_chiron_eval, read_dataset, read_llava_json, read_messages_jsonl,
                      read_reasonseg_dir)
from .sample import FINAL_ANSWER_PREFIX, IMAGE_PLACEHOLDER, SEG_TOKEN, Sample, check_sample
