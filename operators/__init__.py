"""Optimized operators that rule files swap into Hugging Face models.

One file per operator family. Each operator is a `torch.nn.Module` built by
`Cls.from_module(original, *, name, config, device, **kwargs)`, keeps the original module's forward
signature and return type, and accepts the original module's state-dict keys so weights can be
loaded after injection.
"""
