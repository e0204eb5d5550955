"""GPU correctness of the packed int-k kernels against the dense dequantized weight (fp64 reference).

    python bench/check_kernels.py        # a few seconds after Triton compiles; exits 1 on a mismatch
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yaqa.nn import QuantizedLinear  # noqa: E402
from yaqa.quantizers import IntQuantizer  # noqa: E402
from yaqa.rounding import round_weight  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    bad = 0
    for bits in (4, 8, 2, 3):
        for group in (32, 64, 128):
            for m, n, inc in ((200, 1536, False), (96, 640, True)):
                W = torch.randn(m, n, device=dev) * 0.05
                q = IntQuantizer(bits=bits, group_size=group)
                res = round_weight(W, None, None, q, method="rtn", incoherence=7 if inc else False,
                                   return_details=True)
                ql = QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform,
                                                dtype=torch.bfloat16)
                Wd = ql.dequantized_weight().double()
                for rows in (1, 3, 40):
                    for dt in (torch.bfloat16, torch.float16, torch.float32):
                        x = torch.randn(rows, n, device=dev, dtype=dt)
                        y = torch.full((rows, m), float("nan"), device=dev)
                        with torch.no_grad():
                            y = ql(x)
                        ref = x.double() @ Wd.T
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        tol = 1e-2 if dt != torch.float32 else 2e-3
                        ok = err < tol and torch.isfinite(y).all().item()
                        bad += not ok
                        if not ok or (rows == 1 and dt == torch.bfloat16):
                            print(f"int{bits} g{group} {m}x{n} inc={inc} rows={rows} {dt}: "
                                  f"rel err {err:.2e} {'OK' if ok else 'FAIL'}", flush=True)
    print("all kernel checks passed" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
