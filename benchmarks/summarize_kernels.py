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


if __name__ == "__main__":
    main(sys.argv[1])
