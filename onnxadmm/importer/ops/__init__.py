"""Operator families; importing this package registers every op with the registry."""

from . import (  # noqa: F401
    activation,
    contrib,
    conv,
    elementwise,
    experimental,
    linear,
    norm,
    pool,
    recurrent,
    reduce,
    resize,
    shape,
)
