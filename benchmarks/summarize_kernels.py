"""Print the kernel benchmark's ratios (a pytest-benchmark JSON from benchmarks/ops)."""
import json
import sys


def main(path):
    data = json.load(open(path))
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("kernel") == "bnrelu_conv1x1_fwd":
            print(f"fwd C_l={e['C_l']:4d}: fused {e['fused_ms'] * 1e3:8.1f} us ({e['fused_GBps']:7.1f} GB/s, copy "
                  f"{e['copy_GBps']:7.1f}), bare GEMM {e['bare_gemm_ms'] * 1e3:8.1f} us -> fused/GEMM "
                  f"{e['fused_over_gemm']:.2f}; unfused torch {e['unfused_torch_ms'] * 1e3:8.1f} us -> "
                  f"{e['unfused_over_fused']:.1f}x")
        elif e.get("kernel") == "bnrelu_conv1x1_bwd":
            print(f"bwd C_l={e['C_l']:4d}: fused {e['fused_ms'] * 1e3:8.1f} us ({e['fused_GBps']:7.1f} GB/s), "
                  f"unfused torch backward {e['unfused_torch_backward_ms'] * 1e3:8.1f} us -> "
                  f"{e['unfused_over_fused']:.1f}x")
        elif e.get("kernel") == "bnrelu_conv3x3":
            line = f"3x3 N={e['N']} {e['H']}x{e['W']} Cb={e['Cb']} k={e['k']}: aten fwd {e['aten_fwd_ms'] * 1e3:8.1f} us " \
                   f"bwd {e['aten_bwd_ms'] * 1e3:8.1f} us"
            if "triton_fwd_ms" in e:
                line += (f"; triton fwd {e['triton_fwd_ms'] * 1e3:8.1f} us bwd {e['triton_bwd_ms'] * 1e3:8.1f} us "
                         f"-> triton/aten fwd {e['triton_over_aten_fwd']:.2f}, bwd {e['triton_over_aten_bwd']:.2f}")
            print(line)


if __name__ == "__main__":
    main(sys.argv[1])
