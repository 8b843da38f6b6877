"""kit.demo: a real Gradio server on loopback, called by its real client; bad input never breaks it."""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, first_known
from kit.config import COMPETITION_CLASSES, Workdir
from kit.dataset import load_resized
from kit.predict import Predictor, load_model, weights_path

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(smoke_run, real_photos):
    from kit import demo

    # Without what it was taught (a weights file from elsewhere): every photo gets one of its classes. The page that
    # tells an unknown car is test_unknown_cars_are_said_to_be_none_of_its_classes's.
    loaded = dataclasses.replace(load_model(weights_path(Workdir(smoke_run))), known=None)
    page = demo.build_demo(loaded, tta=10, examples=real_photos[:2])
    _, url, _ = demo.launch(page, port=None, examples=real_photos[:2], block=False)
    client = gradio_client.Client(url, verbose=False)
    yield url, client, loaded
    page.close()


def classify(client, path: Path, tta: bool = False) -> dict:
    return client.predict(gradio_client.handle_file(str(path)), tta, api_name="/classify")


def assert_ranked(result: dict) -> list[float]:
    confidences = [c["confidence"] for c in result["confidences"]]
    assert len(confidences) == 5 and confidences == sorted(confidences, reverse=True)
    assert {c["label"] for c in result["confidences"]} <= set(COMPETITION_CLASSES)
    assert result["label"] == result["confidences"][0]["label"]
    return confidences


def test_real_photo_gets_five_ranked_models(server, real_photos):
    _, client, loaded = server
    for tta in (False, True):
        confidences = assert_ranked(classify(client, real_photos[0], tta))
        assert 0 < sum(confidences) <= 1 + 1e-6
    ranked = Predictor(loaded, 10).rank(real_photos[0])  # the same answer from code, all ten classes
    shown = classify(client, real_photos[0], True)["confidences"]
    assert [name for name, _ in ranked[:5]] == [c["label"] for c in shown]
    assert sum(p for _, p in ranked) == pytest.approx(1, abs=1e-5)


def test_unknown_cars_are_said_to_be_none_of_its_classes(smoke_run, real_photos):
    """The smoke model was taught synthetic pictures: one of them is a car it knows, a real photo is not."""
    from kit import demo
    from kit.predict import learn_known

    workdir = Workdir(smoke_run)
    loaded = load_model(weights_path(workdir))
    assert learn_known(workdir, loaded) is not None
    synthetic = sorted(workdir.test_dir.iterdir())
    known = first_known(loaded, synthetic)
    page = demo.build_demo(loaded, tta=2)
    _, url, _ = demo.launch(page, port=None, block=False)
    try:
        client = gradio_client.Client(url, verbose=False)
        assert_ranked(classify(client, known))  # a class it knows heads the answer
        for photo in real_photos[:3]:
            answer = classify(client, photo)
            assert answer["label"] == demo.unknown_headline(COMPETITION_CLASSES)
            assert [c["label"] for c in answer["confidences"]] == [n for n, _ in Predictor(loaded, 1).rank(photo)[:5]]
    finally:
        page.close()


def test_the_page_shows_where_the_model_looked(server, real_photos):
    _, client, loaded = server
    from kit import cam, demo

    shown = client.predict(gradio_client.handle_file(str(real_photos[0])), True, api_name="/explain")
    photo = Image.open(real_photos[0])
    picture = np.asarray(Image.open(shown))
    # Drawn over the photo at the page's size, keeping its shape; the heat map's colours are there.
    assert min(picture.shape[:2]) == min(demo.SHOWN_SIDE, *photo.size)
    assert abs(picture.shape[1] / picture.shape[0] - photo.width / photo.height) < 0.02
    expected = cam.explain(loaded, [load_resized(real_photos[0], Predictor(loaded, 1).short_side)])[0]
    assert expected.heat.max() == pytest.approx(1) and expected.class_index < len(loaded.classes)
    assert client.predict(gradio_client.handle_file(str(real_photos[0])), False, api_name="/explain") is None


def bomb_png(path: Path, width: int = 9000, height: int = 5000) -> Path:
    """A 45-megapixel PNG of a few kilobytes: what a decompression bomb looks like."""
    row = b"\x00" + b"\x00" * width
    data = zlib.compress(row * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_bad_inputs_get_a_message_or_a_prediction(server, real_photos, tmp_path):
    _, client, loaded = server
    photo = Image.open(real_photos[0])
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "truncated.jpg").write_bytes(real_photos[0].read_bytes()[:2000])
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    photo.convert("L").save(tmp_path / "gray.jpg")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    # An EXIF-rotated photo: stored sideways, tagged "rotate 90 CW" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    photo.save(tmp_path / "upright.jpg", quality=95)
    bomb_png(tmp_path / "bomb.png")

    for name in ("notes.txt", "truncated.jpg", "bomb.png"):
        with pytest.raises(gradio_client.exceptions.AppError) as error:
            classify(client, tmp_path / name)
        message = str(error.value)
        assert "could not be read as a photo" in message and "Traceback" not in message and "/tmp/" not in message
    for name in ("alpha.png", "gray.jpg", "cmyk.jpg", "dot.png"):
        assert_ranked(classify(client, tmp_path / name))
    single = Predictor(loaded, 1)
    np.testing.assert_allclose(single.predict_image(tmp_path / "rotated.jpg"),
                               single.predict_image(tmp_path / "upright.jpg"), atol=0.05)
    assert classify(client, tmp_path / "rotated.jpg")["label"] == classify(client, tmp_path / "upright.jpg")["label"]
    assert_ranked(classify(client, real_photos[1]))  # the server still answers


def test_twenty_concurrent_requests(server, real_photos):
    _, client, _ = server
    jobs = [client.submit(gradio_client.handle_file(str(real_photos[k % len(real_photos)])), k % 2 == 0,
                          api_name="/classify") for k in range(20)]
    results = [job.result(timeout=120) for job in jobs]
    assert len(results) == 20 and all(len(r["confidences"]) == 5 for r in results)


def test_uploads_over_the_limit_are_refused(server, real_photos, tmp_path):
    import httpx

    url, client, _ = server
    big = tmp_path / "big.jpg"
    big.write_bytes(real_photos[0].read_bytes() + bytes(21 * 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        classify(client, big)
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("big.jpg", big.read_bytes())})
    assert response.status_code == 413  # the server enforces it too, not only the client
    assert_ranked(classify(client, real_photos[0]))


def test_page_shows_the_model_and_serves_no_other_files(server):
    import httpx

    url, _, loaded = server
    page = httpx.get(url).text
    assert loaded.backbone in page and "stage 7" in page
    for secret in ("/etc/passwd", str(ROOT / "README.md")):
        response = httpx.get(f"{url.rstrip('/')}/gradio_api/file={secret}")
        assert response.status_code in (403, 404)


def test_refuses_to_start_without_weights(tmp_path, capsys):
    from kit.demo import main as demo_main  # in this process: the refusal comes before any page or model

    assert demo_main(["--workdir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "python -m kit.stage --all" in error and "Traceback" not in error


def test_dockerfile_copies_what_exists_and_runs_the_demo():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY source {item} is missing"
    cmd = re.search(r"^CMD\s+(\[.*\])$", dockerfile, re.M).group(1)
    assert '"kit.demo"' in cmd and (ROOT / "kit" / "demo.py").is_file()
    assert re.search(r"^USER\s+(?!root)\S+", dockerfile, re.M), "the image must not run as root"
