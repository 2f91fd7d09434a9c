import array

import numpy as np
import pytest

from geopurify_ros.image_codec import (decode_color, decode_depth, decode_labels, encode_color, encode_depth,
                                       encode_labels)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("enc", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_color_round_trip(enc):
    e, step, data = encode_color(RGB, enc)
    assert e == enc and step == 7 * (4 if enc.endswith("a8") else 3) and len(data) == step * 5
    np.testing.assert_array_equal(decode_color(data, enc, 5, 7, step), RGB)


def test_bgr_byte_order_and_mono():
    px = np.array([[[10, 20, 30]]], np.uint8)
    _, _, data = encode_color(px, "bgr8")
    assert data == bytes([30, 20, 10])
    out = decode_color(bytes([7, 9]), "mono8", 1, 2)
    np.testing.assert_array_equal(out, [[[7, 7, 7], [9, 9, 9]]])


def test_row_padding_step():
    _, _, data = encode_color(RGB, "rgb8")
    padded = b"".join(data[r * 21:(r + 1) * 21] + b"\xff" * 3 for r in range(5))
    np.testing.assert_array_equal(decode_color(padded, "rgb8", 5, 7, step=24), RGB)
    # array.array is what rclpy hands out for uint8[] fields.
    np.testing.assert_array_equal(decode_color(array.array("B", padded), "rgb8", 5, 7, step=24), RGB)


def test_depth_16uc1_endianness_and_invalid():
    mm = np.array([[0, 1000, 1500], [65535, 1, 2500]], np.uint16)
    for big in (False, True):
        data = mm.astype(">u2" if big else "<u2").tobytes()
        d = decode_depth(data, "16UC1", 2, 3, is_bigendian=big)
        assert d.dtype == np.float32
        assert np.isnan(d[0, 0])
        np.testing.assert_allclose(d[0, 1:], [1.0, 1.5])
        np.testing.assert_allclose(d[1], [65.535, 0.001, 2.5], rtol=1e-6)


def test_depth_32fc1_nan_inf_zero_negative():
    m = np.array([[1.25, np.nan, np.inf], [0.0, -1.0, 3.0]], np.float32)
    d = decode_depth(m.astype(">f4").tobytes(), "32FC1", 2, 3, step=12, is_bigendian=True)
    np.testing.assert_array_equal(np.isnan(d), [[False, True, True], [True, True, False]])
    assert d[0, 0] == 1.25 and d[1, 2] == 3.0


def test_depth_encode_round_trip():
    depth = np.array([[1.2344, np.nan], [70.0, 0.5]], np.float32)
    enc, step, data = encode_depth(depth, "16UC1")
    assert (enc, step) == ("16UC1", 4)
    d = decode_depth(data, enc, 2, 2, step)
    np.testing.assert_allclose(d[0, 0], 1.234, atol=1e-6)
    assert np.isnan(d[0, 1]) and np.isnan(d[1, 0])  # 70 m does not fit 16 bits of mm -> invalid
    enc, step, data = encode_depth(depth, "32FC1")
    np.testing.assert_array_equal(decode_depth(data, enc, 2, 2, step), depth)


def test_labels_round_trip():
    lab = np.array([[0, 19, 65535]], np.uint16)
    enc, step, data = encode_labels(lab)
    np.testing.assert_array_equal(decode_labels(data, enc, 1, 3, step), lab)
    with pytest.raises(ValueError, match="labels"):
        encode_labels(np.array([[-1]]))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="encoding: unsupported '8UC3' for depth"):
        decode_depth(b"\0" * 18, "8UC3", 2, 3)
    with pytest.raises(ValueError, match="encoding.*color"):
        decode_color(b"\0" * 6, "yuv422", 1, 2)
    with pytest.raises(ValueError, match="data"):
        decode_color(b"\0" * 5, "rgb8", 1, 2)
    with pytest.raises(ValueError, match="step"):
        decode_depth(b"\0" * 12, "16UC1", 2, 3, step=4)
    with pytest.raises(ValueError, match="height"):
        decode_depth(b"", "16UC1", 0, 3)
    with pytest.raises(ValueError, match="encoding"):
        decode_labels(b"\0" * 4, "32FC1", 1, 1)


def test_shaped_ndarray_input():
    mm = np.array([[1000, 0]], np.uint16)
    d = decode_depth(mm, "16UC1", 1, 2)
    assert d[0, 0] == 1.0 and np.isnan(d[0, 1])
    np.testing.assert_array_equal(decode_color(RGB, "rgb8", 5, 7), RGB)
