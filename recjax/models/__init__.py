"""Model families; importing this package registers every model."""

from recjax.models import dcnv2, dlrm, rankmixer, tokenmixer_large  # noqa: F401  (registration side effects)
