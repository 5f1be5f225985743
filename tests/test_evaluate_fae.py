"""evaluate_fae.py: PSNR and rFID of a whole FAE file on a held-out folder equal a direct computation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fae_fast.config import encoder_config
from fae_fast.data.backends import decode_reference
from fae_fast.data.synthetic import jpeg_bytes, photo
from fae_fast.encoders import FrozenEncoder
from fae_fast.eval.recon import mean_psnr, psnr, rfid_from_features, to_uint8
from training import evaluate_fae

from conftest import PooledPixels, write_random_fae  # noqa: E402 (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """root/val/<class>/*.JPEG (3 classes x 8 photos of several sizes), a tiny encoder's weights file and a
    whole random FAE-tiny file with its config, as train_fae.py writes them."""
    tmp = tmp_path_factory.mktemp("held_out")
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = tmp / "data" / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(8):
            h, w = ((80, 96), (64, 64), (100, 70))[(c + i) % 3]
            (folder / f"img_{i}.JPEG").write_bytes(jpeg_bytes(Image.fromarray(photo(h, w, rng))))
    torch.manual_seed(0)
    encoder = FrozenEncoder(encoder_config("tiny"))
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(tmp / "encoder.safetensors"))
    _, _, parts = write_random_fae(tmp, ("encoder", "feature_decoder", "pixel_decoder"))
    return {"tmp": tmp, "encoder": encoder, "parts": [p.eval() for p in parts.values()]}


def args(held_out, *extra):
    tmp = held_out["tmp"]
    return [f"--fae={tmp / 'fae.safetensors'}", "--encoder=tiny", f"--encoder_weights={tmp / 'encoder.safetensors'}",
            f"--data.root={tmp / 'data'}", "--data.backend=pil", "--data.workers=0", "--data.batch_size=5", *extra]


def direct_scores(held_out, n: int) -> tuple[float, float]:
    """PSNR and rFID of the first n sorted images, computed without the program."""
    files = sorted((held_out["tmp"] / "data" / "val").glob("*/*.JPEG"))[:n]
    crops = torch.stack([torch.from_numpy(decode_reference(f.read_bytes(), 64)).permute(2, 0, 1) for f in files])
    fae, feature_decoder, pixel_decoder = held_out["parts"]
    with torch.no_grad():
        recon = pixel_decoder(feature_decoder(fae.encode(held_out["encoder"](crops.float() / 255), sample=False)[1]))
    fake = to_uint8(recon)
    extractor = PooledPixels()
    return mean_psnr(psnr(crops, fake)), rfid_from_features(extractor(crops)[0].double(), extractor(fake)[0].double())


@pytest.mark.parametrize("max_images", [0, 20])
def test_scores_equal_a_direct_computation(held_out, tmp_path, monkeypatch, max_images):
    monkeypatch.setattr(evaluate_fae, "RFID_MIN_IMAGES", 16)
    out = tmp_path / "recon.json"
    record = evaluate_fae.main(args(held_out, f"--max_images={max_images}", f"--out={out}"), extractor=PooledPixels())
    n = max_images or 24
    want_psnr, want_rfid = direct_scores(held_out, n)
    assert record["num_images"] == n
    loose = torch.cuda.is_available()  # the program runs the encoder in bf16 on CUDA, the direct path in fp32
    assert record["psnr"] == pytest.approx(want_psnr, rel=1e-2 if loose else 1e-4)
    assert record["rfid"] == pytest.approx(want_rfid, rel=5e-2 if loose else 1e-3) and record["rfid"] > 0
    assert json.loads(out.read_text())["rfid"] == record["rfid"]


def test_bad_inputs_name_the_fix(held_out, tmp_path):
    with pytest.raises(FileNotFoundError, match="--fae=.*pixel-finetune"):
        evaluate_fae.main(args(held_out, f"--fae={tmp_path / 'nope.safetensors'}"), extractor=PooledPixels())
    with pytest.raises(FileNotFoundError, match="has no 'val' folder"):
        evaluate_fae.main(args(held_out, f"--data.root={tmp_path}"), extractor=PooledPixels())
    with pytest.raises(ValueError, match="under 2048"):
        evaluate_fae.main(args(held_out, "--max_images=100"), extractor=PooledPixels())
    with pytest.raises(ValueError, match="holds 24 images, under the 2048"):
        evaluate_fae.main(args(held_out), extractor=PooledPixels())
