"""Model families; importing this package registers every model."""

from recjax.models import dcnv2, dlrm, rankmixer, seqrec, tokenmixer_large  # noqa: F401  (registration side effects)
