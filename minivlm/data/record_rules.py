"""The rules every reader applies to a record (readers.py's docstring states them): where a
relative image name resolves, how image placeholders are added, LLaVA's speaker names.

They live apart from readers.py so that the readers of other formats (hf_datasets.py,
tar_shards.py) can share them while readers.py dispatches to those readers: no import cycle.
"""

from __future__ import annotations

from pathlib import Path

from minivlm.constants import IMAGE_TOKEN
from minivlm.data.sample import get_field

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
               "assistant": "assistant"}


# A caption record's question (the synthetic world's pretrain.json, a caption shard's samples).
PRETRAIN_PROMPTS = ("Write a short caption for the image.", "What is in the picture?")


def resolve_image(name: str, image_dir: Path, where: str) -> Path:
    """The file a record's image name points to: absolute as given, else under `image_dir` or
    its images/ folder."""
    candidates = ([Path(name)] if Path(name).is_absolute()
                  else [image_dir / name, image_dir / "images" / name])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"{where}: image '{name}' not found "
                     f"(looked for {' and '.join(map(str, candidates))})")


def add_placeholders(turns: list[dict], num_images: int, where: str) -> list[dict]:
    """Prepend one placeholder per image to the first user turn when the text has none."""
    found = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
    if found == 0 and num_images > 0:
        first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{where}: {num_images} image(s) but no user turn to put them in")
        turns = [dict(t) for t in turns]
        turns[first_user]["content"] = ((IMAGE_TOKEN + "\n") * num_images
                                        + turns[first_user]["content"])
    elif found != num_images:
        raise ValueError(f"{where}: {found} {IMAGE_TOKEN} placeholder(s) in the text "
                         f"but {num_images} image(s) listed")
    return turns


def llava_turns(conversations: object, where: str) -> list[dict]:
    """LLaVA's [{"from", "value"}] as turns, each speaker checked."""
    if not isinstance(conversations, list):
        raise ValueError(f"{where}: 'conversations' should be a list, "
                         f"found {type(conversations).__name__}")
    turns = []
    for i, message in enumerate(conversations):
        at = f"{where}: conversations[{i}]"
        speaker = get_field(message, "from", str, at)
        if speaker not in LLAVA_ROLES:
            raise ValueError(f"{at}: 'from' should be one of {sorted(LLAVA_ROLES)}, "
                             f"found '{speaker}'")
        turns.append({"role": LLAVA_ROLES[speaker],
                      "content": get_field(message, "value", str, at)})
    return turns
