"""load_image: every PIL mode to the RGB a viewer sees, checked pixel by pixel."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivlm.data.images import ImageError, image_size, load_image

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pixel(image: Image.Image, x: int, y: int) -> tuple:
    assert image.mode == "RGB"
    return image.getpixel((x, y))


def test_rgba_is_composited_not_channel_dropped(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 127)  # half-transparent red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent, stored black
    rgba[0, 2] = (10, 20, 30, 255)  # opaque
    rgba[1, :] = (0, 0, 255, 51)  # 20% blue
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = load_image(path)
    # out = (c * a + 255 * (255 - a)) / 255, rounded: green = 255 * 128 / 255 = 128
    assert pixel(image, 0, 0) == (255, 128, 128)
    assert pixel(image, 1, 0) == (255, 255, 255)  # dropping alpha would give black
    assert pixel(image, 2, 0) == (10, 20, 30)
    assert pixel(image, 0, 1) == (204, 204, 255)  # 255 * 204 / 255 = 204
    on_black = load_image(path, background=(0, 0, 0))
    assert pixel(on_black, 0, 0) == (127, 0, 0)  # 255 * 127 / 255


def test_la_composited(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 127], [200, 255]]], dtype=np.uint8), "LA").save(path)
    image = load_image(path)
    assert pixel(image, 0, 0) == (128, 128, 128)  # black at half alpha over white
    assert pixel(image, 1, 0) == (200, 200, 200)


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "p.png"
    image = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    image.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.save(path, transparency=bytes([0, 255, 127]))  # index 0 clear, 2 half-transparent
    assert Image.open(path).mode == "P"
    loaded = load_image(path)
    assert pixel(loaded, 0, 0) == (255, 255, 255)  # transparent black index shows the background
    assert pixel(loaded, 1, 0) == (0, 0, 255)
    assert pixel(loaded, 2, 0) == (128, 255, 128)


def test_palette_without_transparency_and_gray_modes(tmp_path):
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    palette.save(tmp_path / "p.png")
    assert pixel(load_image(tmp_path / "p.png"), 1, 0) == (200, 100, 50)

    Image.fromarray(np.array([[77, 250]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert pixel(load_image(tmp_path / "l.png"), 0, 0) == (77, 77, 77)

    Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").convert("1").save(
        tmp_path / "one.png")
    one = load_image(tmp_path / "one.png")
    assert (pixel(one, 0, 0), pixel(one, 1, 0)) == ((0, 0, 0), (255, 255, 255))


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    path = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, "CMYK").save(path)
    image = load_image(path)
    assert [pixel(image, x, 0) for x in range(3)] == [(255, 0, 0), (0, 0, 0), (255, 255, 255)]


def test_16_bit_is_stretched_by_its_range_not_clipped(tmp_path):
    values = np.array([[0, 2048, 4095]], dtype=np.uint16)  # a 12-bit CT slice
    path = tmp_path / "i16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image = load_image(path)
    assert [pixel(image, x, 0)[0] for x in range(3)] == [0, round(2048 * 255 / 4095), 255]
    assert pixel(image, 1, 0) == (128, 128, 128)


def test_int32_and_float_stretched(tmp_path):
    Image.fromarray(np.array([[-1000, 0, 3000]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    assert [pixel(load_image(tmp_path / "i.tif"), x, 0)[0] for x in range(3)] == [
        0, round(1000 * 255 / 4000), 255]
    Image.fromarray(np.array([[0.5, 0.75, 1.5]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert [pixel(load_image(tmp_path / "f.tif"), x, 0)[0] for x in range(3)] == [
        0, round(0.25 * 255), 255]
    Image.fromarray(np.full((2, 2), 700, dtype=np.uint16)).save(tmp_path / "flat.png")
    assert pixel(load_image(tmp_path / "flat.png"), 0, 0) == (0, 0, 0)  # no range: black


def test_exif_orientation_applied_and_size_agrees(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 20), (200, 0, 0)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert image_size(path) == (20, 40)


def test_errors_name_the_file_in_one_line(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match=f"^{missing}: file not found$"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError) as error:  # ImageError is a ValueError
        load_image(text)
    assert str(error.value).startswith(f"{text}: ") and "\n" not in str(error.value)

    good = tmp_path / "good.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError) as error:
        load_image(truncated)
    assert str(error.value).startswith(f"{truncated}: ") and "\n" not in str(error.value)


def test_fixture_images_load_as_rgb():
    palette = FIXTURES / "chiron_o1_eval/images/156702/x-ray_group1/0.png"
    rgba = FIXTURES / "chiron_o1_eval/images/197850/x-ray_group1/0.png"
    gray_jpeg = FIXTURES / "chiron_o1_eval/images/197271/ct_group1/0.jpeg"
    rgb_jpeg = FIXTURES / "chiron_o1_eval/images/185438/mri_group1/0.jpeg"
    assert Image.open(palette).mode == "P" and Image.open(rgba).mode == "RGBA"

    loaded = load_image(palette)
    assert loaded.mode == "RGB" and loaded.size == (389, 647)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(palette).convert("RGB")))

    loaded = load_image(rgba)  # fully opaque: compositing must leave the colours untouched
    assert loaded.mode == "RGB" and loaded.size == (1137, 1948)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(rgba))[..., :3])

    loaded = load_image(gray_jpeg)
    assert loaded.mode == "RGB" and loaded.size == (512, 512)
    gray = np.asarray(Image.open(gray_jpeg))
    assert np.array_equal(np.asarray(loaded), np.repeat(gray[..., None], 3, axis=2))
    assert load_image(rgb_jpeg).mode == "RGB" and image_size(rgb_jpeg) == (512, 512)
