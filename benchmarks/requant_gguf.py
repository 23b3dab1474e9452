"""Write a GGUF file again with every 2-D tensor in another block type (Q8_0, Q4_0, Q4_1,
F32, ...), by gguf-py: dequantise each tensor, quantise it with ``gguf.quants.quantize``,
copy the metadata as it is. For benchmarks that need SmolLM2 at Q8_0 / Q4_0 when only its
Q4_1 file is installed (llama.cpp's ``llama_model_quantize`` makes the same block layouts;
its files round differently from requantising a Q4_1 file, so compare only runs on the same
file).

    PYTHONPATH=src python benchmarks/requant_gguf.py SRC.gguf DST.gguf --type Q8_0
    PYTHONPATH=src python benchmarks/requant_gguf.py smollm2-135m /tmp/smollm2-q4_0.gguf --type Q4_0
"""
from __future__ import annotations

import argparse

import gguf
import numpy as np


def requantize(src: str, dst: str, qtype: gguf.GGMLQuantizationType) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]                  # numpy order (rows, K)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", help="a .gguf file, or smollm2-135m (the installed Q4_1 file)")
    ap.add_argument("dst")
    ap.add_argument("--type", default="Q8_0", help="ggml type of the 2-D tensors")
    a = ap.parse_args()
    from parallax.loading import resolve_model_path
    requantize(resolve_model_path(a.src), a.dst, gguf.GGMLQuantizationType[a.type.upper()])


if __name__ == "__main__":
    main()
