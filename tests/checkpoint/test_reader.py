"""Reading tensors from safetensors shards (finefp8.checkpoint.reader)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from finefp8.checkpoint.reader import read_header, read_rows


def test_read_rows_gives_the_stored_values_in_64_byte_aligned_memory(tmp_path):
    """Rows read with ``pread`` equal the stored rows, and every result starts on a 64-byte
    boundary whatever the tensor's offset in the file, as a tensor torch computes does: BLAS
    may round differently on differently aligned inputs, so a resumed calibration reading its
    weights and hidden states from disk must see them aligned as an uninterrupted run does."""
    g = torch.Generator().manual_seed(0)
    # odd sizes put the tensors at offsets that are not multiples of 64 in the file
    tensors = {f"t{i}": torch.randn(3 + i, 5 + 2 * i, generator=g) for i in range(12)}
    tensors["b"] = torch.randn(7, 9, generator=g).to(torch.bfloat16)
    tensors["v"] = torch.randn(13, generator=g)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    infos, _ = read_header(tmp_path / "m.safetensors")
    assert {i.offset % 64 for i in infos.values()} != {0}
    for _ in range(5):  # a bytearray lands at varying addresses modulo 64; torch's never
        for key, want in tensors.items():
            info = infos[key]
            rows = want.shape[0]
            r0, r1 = (1, rows - 1) if want.dim() == 2 else (0, rows)
            got = read_rows(tmp_path, info, r0, r1)
            assert got.data_ptr() % 64 == 0, key
            assert torch.equal(got, want[r0:r1] if want.dim() == 2 else want), key
