"""Executor service: cache engine, paged model, attention backends, sampler."""
from pagedserve.common.import_path import drop_checkout_from_path

# Before transformers is first imported (by this package's modules): from a checkout's root,
# our kernels/ would answer its import of Hugging Face's `kernels`.
drop_checkout_from_path()
