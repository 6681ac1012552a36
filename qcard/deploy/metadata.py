"""Metadata that travels with an exported model: what a user of the file needs to run it right and to find
the card it came from.

- `card_metadata(card, ...)`: ONNX `metadata_props` (strings; onnxruntime reads them as
  `get_modelmeta().custom_metadata_map`): the card id, the qcard version and commit that made the card and
  the one that exported it, the recipe in words and as JSON, the preprocessing (mean, std, input shape,
  resize, crop, pixel scale), the class names when the dataset names them, and the card's top-1.
- `write_metadata(path, props)`: puts them into an ONNX file (checked, written atomically).
- `hf_front_matter(card, ...)`: the YAML front matter of a Hugging Face model card (`model-index` with the
  top-1, its dataset and metric; the quantization settings).

Everything is read from the card as a dict (card.json): this module sits below qcard.cards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

PREFIX = "qcard."


def _bits(v: Any) -> str:
    return "FP32" if v is None else f"{v:g}"


def _words(v: Any) -> str:
    return str(v).replace("_", "-")


def recipe_summary(card: Dict[str, Any]) -> str:
    """The quantization recipe in one line, from the card's quantization and method blocks, e.g.
    'ptq W8A8: weights per-channel symmetric (mse ranges, nearest rounding), activations per-tensor asymmetric
    (mse ranges); BN folded; first/last layer W8A8/W8A8; calibration 256 images from train (seed 0)'."""
    q, m = card.get("quantization") or {}, card.get("method") or {}
    w, a = q.get("weights") or {}, q.get("activations") or {}
    bits = f"W{_bits(w.get('bits'))}A{_bits(a.get('bits'))}"
    label = m.get("label")
    parts = [f"{m.get('name')} {bits}" + (f" (label {label})" if label and label not in (m.get("name"), bits) else "")]
    sym = lambda s: None if s is None else ("symmetric" if s else "asymmetric")

    def side(name: str, block: Dict[str, Any]) -> Optional[str]:
        if block.get("bits") is None:
            return None
        words = [x for x in (_words(block["granularity"]) if block.get("granularity") else None,
                             sym(block.get("symmetric"))) if x]
        extra = [x for x in (f"{block['range_setting']} ranges" if block.get("range_setting") else None,
                             f"{block['rounding']} rounding" if block.get("rounding") else None) if x]
        return f"{name} {' '.join(words) or 'quantized'}" + (f" ({', '.join(extra)})" if extra else "")

    details = [s for s in (side("weights", w), side("activations", a)) if s]
    tail = []
    if q.get("batch_norm"):
        tail.append(f"BN {_words(q['batch_norm'])}")
    fl = [q.get("first_layer"), q.get("last_layer")]
    if all(isinstance(x, dict) for x in fl):
        tail.append("first/last layer " + "/".join(f"W{_bits(x.get('weight_bits'))}A{_bits(x.get('activation_bits'))}"
                                                    for x in fl))
    cal = ((card.get("dataset") or {}).get("calibration") or {})
    if cal.get("size"):
        use = " for training" if cal.get("used_for") == "training" else ""
        tail.append(f"calibration {cal['size']:,} images from {cal.get('split')}{use} (seed {cal.get('seed')})")
    text = parts[0] + (": " + ", ".join(details) if details else "")
    return text + ("; " + "; ".join(tail) if tail else "")


def preprocessing(card: Dict[str, Any]) -> Dict[str, Any]:
    """What a caller must do to an image before the model sees it: the dataset's preprocessing as the card
    records it, with the model's input shape."""
    ds, model = card.get("dataset") or {}, card.get("model") or {}
    pre = dict(ds.get("preprocessing") or {})
    shape = pre.get("input_shape") or model.get("input_shape")
    out = {k: pre.get(k) for k in ("source_scale", "mean", "std", "resize", "crop")}
    out["input_shape"] = list(shape) if shape else None
    out["layout"] = "NCHW, batch first (dynamic)"
    return {k: v for k, v in out.items() if v is not None}


def class_names_of(dataset: Any) -> Optional[List[str]]:
    """The dataset's class names, when it has them for every output (an image folder's class folders);
    None otherwise (e.g. folders of ImageNet wnids mapped onto a 1000-class model, or numbered classes)."""
    names = getattr(dataset, "classes", None)
    n = getattr(dataset, "num_classes", None)
    if names is None or n is None or len(names) != int(n):
        return None
    return [str(x) for x in names]


def _interval(iv: Optional[Sequence[float]], signed: bool = False) -> str:
    if not iv:
        return ""
    f = "+.1f" if signed else ".1f"
    return f" [{iv[0]:{f}}, {iv[1]:{f}}]"


def top1_text(card: Dict[str, Any]) -> str:
    """'98.70 % top-1 [97.8, 99.2] (95 % interval) on 1,000 images of qcard:mnist5k/test; FP32 98.50, Δ +0.20'."""
    r, ds = card.get("results") or {}, card.get("dataset") or {}
    if r.get("quantized") is None:
        return "no top-1 (the point did not finish)"
    n = f"{ds['eval_size']:,} images of " if isinstance(ds.get("eval_size"), int) else ""
    text = f"{r['quantized']:.2f} % top-1{_interval(r.get('ci95'))}"
    text += " (95 % interval)" if r.get("ci95") else ""
    text += f" on {n}{ds.get('ref')}/{ds.get('eval_split')}"
    if r.get("fp32") is not None:
        text += f"; FP32 {r['fp32']:.2f}"
    if r.get("delta") is not None:
        text += f", Δ {r['delta']:+.2f}{_interval(r.get('delta_ci95'), signed=True)}"
    return text


def card_metadata(card: Dict[str, Any], class_names: Optional[Sequence[str]] = None,
                  exporter: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """ONNX metadata_props for the model of `card` (card.json as a dict). exporter: the qcard that writes the
    file ({"version", "git_commit", "git_dirty"}), when it is not the one that made the card."""
    prov, model, method = card.get("provenance") or {}, card.get("model") or {}, card.get("method") or {}
    q = card.get("quantization") or {}
    recipe = {"method": method.get("name"), "label": method.get("label"), "params": method.get("params") or {},
              "weights": q.get("weights"), "activations": q.get("activations"),
              "first_layer": q.get("first_layer"), "last_layer": q.get("last_layer"),
              "batch_norm": q.get("batch_norm"), "residual_add": q.get("residual_add"),
              "calibration": (card.get("dataset") or {}).get("calibration")}
    props: Dict[str, Any] = {
        "card_id": card.get("id"),
        "experiment": card.get("experiment"),
        "model": model.get("ref"),
        "weights_sha256": model.get("weights_sha256"),
        "dataset": (card.get("dataset") or {}).get("ref"),
        "card_qcard_version": prov.get("qcard_version"),
        "card_git_commit": prov.get("git_commit"),
        "card_git_dirty": None if prov.get("git_dirty") is None else str(bool(prov["git_dirty"])).lower(),
        "recipe": recipe_summary(card),
        "recipe_json": json.dumps(recipe, sort_keys=True, default=str),
        "preprocessing": json.dumps(preprocessing(card), sort_keys=True),
        "input_shape": ",".join(str(x) for x in preprocessing(card).get("input_shape", [])) or None,
        "top1": top1_text(card),
        "reproduce": card.get("reproduce"),
    }
    if class_names:
        props["class_names"] = json.dumps(list(class_names))
    if exporter:
        props["export_qcard_version"] = exporter.get("version")
        props["export_git_commit"] = exporter.get("git_commit")
        if exporter.get("git_dirty") is not None:
            props["export_git_dirty"] = str(bool(exporter["git_dirty"])).lower()
    return {PREFIX + k: str(v) for k, v in props.items() if v is not None and v != ""}


def write_metadata(path: Union[str, Path], props: Dict[str, str], doc_string: Optional[str] = None) -> None:
    """Set `props` in the ONNX file's metadata_props (replacing keys of the same name, keeping the others),
    check the model and write it back atomically."""
    import onnx
    path = Path(path)
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if doc_string:
        model.doc_string = doc_string
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def hf_front_matter(card: Dict[str, Any], model_file: str = "model.onnx") -> Dict[str, Any]:
    """The YAML front matter of a Hugging Face model card (README.md) for the card's exported model:
    `model-index` with the card's top-1 (its interval in the metric's name), the dataset and split it was
    measured on; the quantization settings under `qcard`."""
    r, ds, model, method = (card.get(k) or {} for k in ("results", "dataset", "model", "method"))
    prov, q = card.get("provenance") or {}, card.get("quantization") or {}
    name = f"{model.get('label') or model.get('ref')} {method.get('label') or method.get('name')}"
    interval = _interval(r.get("ci95"))
    metric = {"type": "accuracy", "value": round(float(r["quantized"]), 4),
              "name": "top-1 accuracy (%)" + (f", 95 % interval{interval}" if interval else ""),
              "verified": False}
    n = ds.get("eval_size")
    result = {"task": {"type": "image-classification", "name": "Image Classification"},
              "dataset": {"name": f"{ds.get('ref')} ({ds.get('eval_split')}" + (f", {n:,} images)" if n else ")"),
                          "type": str(ds.get("ref")), "split": str(ds.get("eval_split"))},
              "metrics": [metric]}
    if ds.get("fingerprint"):      # the eval set's fingerprint (qcard): the same images give the same one
        result["dataset"]["args"] = {"fingerprint": str(ds["fingerprint"])}
    w, a = q.get("weights") or {}, q.get("activations") or {}
    return {
        "library_name": "onnx",
        "pipeline_tag": "image-classification",
        "tags": ["qcard", "quantization", "onnx", f"W{_bits(w.get('bits'))}A{_bits(a.get('bits'))}",
                 str(method.get("name"))],
        "model-index": [{"name": name, "results": [result]}],
        "qcard": {
            "card_id": card.get("id"),
            "model": model.get("ref"),
            "model_file": model_file,
            "recipe": recipe_summary(card),
            "weights": {k: w.get(k) for k in ("bits", "granularity", "symmetric", "range_setting", "rounding")
                        if w.get(k) is not None},
            "activations": {k: a.get(k) for k in ("bits", "granularity", "symmetric", "range_setting")
                            if a.get(k) is not None},
            "batch_norm": q.get("batch_norm"),
            "preprocessing": preprocessing(card),
            "fp32_top1": r.get("fp32"),
            "delta": r.get("delta"),
            "qcard_version": prov.get("qcard_version"),
            "git_commit": prov.get("git_commit"),
        },
    }
