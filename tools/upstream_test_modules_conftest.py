# conftest.py for running PyTorch's own test/test_modules.py BatchNorm entries against torch.nn (default)
# or bnref's layers (BNREF_SWAP=1); see README "PyTorch's own BatchNorm test cases". module_db's
# BatchNorm1d/2d/3d entries get bnref's classes, while their input generators still see torch.nn's class
# (they choose the input shape by comparing with it).
import functools
import os

if os.environ.get("BNREF_SWAP") == "1":
    from torch import nn
    from torch.testing._internal.common_modules import module_db

    import bnref.torch as bt

    swap = {nn.BatchNorm1d: bt.BatchNorm1d, nn.BatchNorm2d: bt.BatchNorm2d, nn.BatchNorm3d: bt.BatchNorm3d}

    def as_torch_nn(func, orig):
        @functools.wraps(func)
        def inputs(module_info, *args, **kwargs):
            ours, module_info.module_cls = module_info.module_cls, orig
            try:
                return func(module_info, *args, **kwargs)
            finally:
                module_info.module_cls = ours
        return inputs

    n = 0
    for info in module_db:
        if info.module_cls in swap:
            orig = info.module_cls
            info.module_inputs_func = as_torch_nn(info.module_inputs_func, orig)
            if info.module_error_inputs_func is not None:
                info.module_error_inputs_func = as_torch_nn(info.module_error_inputs_func, orig)
            info.module_cls = swap[orig]
            n += 1
    assert n == 3, n
