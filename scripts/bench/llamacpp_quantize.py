"""llama-quantize through llama-cpp-python (the same llama_model_quantize call as the tool):
    python scripts/bench/llamacpp_quantize.py IN.gguf OUT.gguf q4_k_m|q8_0 [THREADS]"""
import ctypes
import sys

import llama_cpp

FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = FTYPES[sys.argv[3]]
p.nthread = int(sys.argv[4]) if len(sys.argv) > 4 else 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
