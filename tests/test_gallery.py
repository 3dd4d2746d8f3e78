import io

import numpy as np
import pytest
from PIL import Image

from tpr_ray.errors import ConfigError, DataError
from tpr_ray.gallery import gallery_rows, list_images, query_rows
from tpr_ray.images import decode_image, resize_uint8


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_prefix_listing_is_sorted_recursive_and_keeps_only_images(tmp_path):
    for name in ["b/2.jpg", "a/1.PNG", "a/notes.txt", "c/d/3.jpeg"]:
        touch(tmp_path / "g" / name)
    table = list_images(str(tmp_path / "g"))
    assert table.column("image_id").to_pylist() == ["a/1.PNG", "b/2.jpg", "c/d/3.jpeg"]
    assert table.column("image_uri").to_pylist()[0] == str(tmp_path / "g" / "a" / "1.PNG")
    assert table.column("person_id").null_count == 3


def test_glob_listing_ids_are_relative_to_the_fixed_part(tmp_path):
    for name in ["cam1/x.jpg", "cam2/y.jpg", "cam2/y.png"]:
        touch(tmp_path / "g" / name)
    table = list_images(str(tmp_path / "g" / "**" / "*.jpg"))
    assert table.column("image_id").to_pylist() == ["cam1/x.jpg", "cam2/y.jpg"]


def test_empty_listing_and_ambiguous_source_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list_images(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such folder"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="either"):
        gallery_rows(data="x", images="y")


def test_query_rows_number_captions_in_manifest_order():
    import pyarrow as pa
    images = pa.table({"image_id": ["a", "b"], "person_id": [3, 4], "captions": [["c1", "c2"], ["c3"]]})
    q = query_rows(images)
    assert q.column("query_id").to_pylist() == [0, 1, 2]
    assert q.column("image_id").to_pylist() == ["a", "a", "b"]
    assert q.column("person_id").to_pylist() == [3, 3, 4]
    assert q.column("caption").to_pylist() == ["c1", "c2", "c3"]


def test_large_jpeg_is_decoded_reduced_but_never_below_the_target():
    buf = io.BytesIO()
    Image.new("RGB", (4000, 12000), (10, 200, 30)).save(buf, "JPEG")
    img = decode_image(buf.getvalue(), (384, 128))
    assert img.size[0] >= 128 and img.size[1] >= 384 and img.size[0] < 4000
    pixels = resize_uint8(img, (384, 128))
    assert pixels.shape == (384, 128, 3)
    assert np.abs(pixels.reshape(-1, 3).mean(0) - [10, 200, 30]).max() < 3
