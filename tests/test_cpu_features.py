"""The executor names its processor and the extensions that decide its fastest kernels."""
from pagedserve.executor_svc.cpu_features import EXTENSIONS, CpuInfo, cpu_info, parse_cpuinfo

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni avx512f
"""

XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx512dq
flags2\t: avx512bw avx512vl
"""


def test_the_first_processor_s_name_and_extensions_are_read_in_a_fixed_order():
    assert parse_cpuinfo(ZEN3) == CpuInfo("AMD EPYC", ("avx2", "fma"))  # not the second's
    xeon = parse_cpuinfo(XEON_AMX)
    assert xeon.has("amx_bf16") and not xeon.has("avx512bw")  # only the "flags" line counts
    assert xeon.describe() == ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz: "
                               "avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 amx_tile "
                               "amx_bf16 amx_int8")


def test_a_processor_without_any_of_the_extensions_says_so():
    info = parse_cpuinfo("model name : Old\nflags : fpu sse2\n")
    assert not info.has("avx2") and info.describe().startswith("Old: none of avx2, fma")


def test_this_machine_is_described_by_its_own_cpuinfo():
    info = cpu_info()
    assert info.model and set(info.extensions) <= set(EXTENSIONS)
