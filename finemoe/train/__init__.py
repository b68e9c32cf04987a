"""Training: the loop, LR schedule, checkpoint/resume, metrics log, DDP and sampling."""

import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    """`finemoe.train(config)` is the public API's train (finemoe.train.entry); the subpackage of the
    same name is made callable so that the name means one thing however it was imported."""

    def __call__(self, *args, **kwargs):
        from finemoe.train.entry import train

        return train(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
