"""Zero-shot classification and retrieval with CLIP-aligned encoders: expert knowledge and prompts
(:mod:`.knowledge`), captioned data (:mod:`.data`), alignment training (:mod:`.trainer`), evaluation
(:mod:`.evaluate`). The command lines are ``pretrain/clip.py``, ``downstream/zeroshot.py`` and
``downstream/retrieval.py``."""

from ...data.knowledge import DEFAULT_KNOWLEDGE, Category, KnowledgeBase, KnowledgeError, fill_template

__all__ = ["DEFAULT_KNOWLEDGE", "Category", "KnowledgeBase", "KnowledgeError", "fill_template"]
