"""Training / evaluation text: documents from ShareGPT, local files or the hub, packed into token rows."""

from linearize.data.packing import is_heldout, pack_sequences
from linearize.data.sources import DEFAULT_DATA, iter_documents, iter_sharegpt, sharegpt_path

__all__ = ["DEFAULT_DATA", "is_heldout", "iter_documents", "iter_sharegpt", "pack_sequences", "sharegpt_path"]
