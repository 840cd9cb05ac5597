"""The main job runs end to end: synthetic video and a real file decoded with PyAV."""
import pytest
import torch

from retake_ops import demo


def test_synthetic_video_cuts_become_keyframes(tmp_path, capsys):
    result = demo.main(["--frames", "120", "--shots", "4", "--out", str(tmp_path)])
    assert len(result["cuts"]) == 3
    assert set(result["cuts"]) <= set(result["keyframes"])  # hard cuts are distance peaks
    assert len(result["kept"]) == 30 and result["kept"] == sorted(result["kept"])
    png = tmp_path / "dpselect.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cuts that became keyframes: 3/3" in capsys.readouterr().out


def test_video_file_is_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    video, cuts = demo.synthetic_video(48, 3, seed=1)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = demo.SIZE, demo.SIZE, "yuv420p"
        for frame in video.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    decoded = demo.decode_video(str(path), max_frames=48)
    assert decoded.shape == (48, demo.SIZE, demo.SIZE, 3) and decoded.dtype == torch.uint8
    result = demo.main(["--video", str(path), "--out", str(tmp_path)])
    assert result["cuts"] == [] and len(result["kept"]) == 12
    assert set(cuts) <= set(result["keyframes"])
