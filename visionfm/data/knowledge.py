"""Expert knowledge for captions and zero-shot prompts (``configs/knowledge/ophthalmology.yaml``).

A :class:`KnowledgeBase` maps categories (``diabetic_macular_edema``...) to names and clinical descriptions, and
modalities to caption templates (``"A fundus photograph of [CLS]."``). Training captions fill a random template with
the category's name or, as in FLAIR, a random description; zero-shot prompts for a class are every template filled
with every name and description, and the class prototype averages their normalised embeddings.

Example:
    >>> kb = KnowledgeBase.load()
    >>> kb.resolve("no macular edema").key
    'no_diabetic_macular_edema'
    >>> fill_template("A fundus photograph of [CLS].", "hard exudates")
    'A fundus photograph of hard exudates.'
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple


from ..errors import VisionFMError
from ..config import CONFIG_DIR, ConfigError, load_yaml
from ..modalities import get_modality

__all__ = ["DEFAULT_KNOWLEDGE", "PLACEHOLDER", "KnowledgeError", "Category", "KnowledgeBase", "fill_template",
           "normalise_name"]

#: The knowledge file used when none is given.
DEFAULT_KNOWLEDGE = CONFIG_DIR / "knowledge" / "ophthalmology.yaml"
#: What a template's class slot looks like.
PLACEHOLDER = "[CLS]"


class KnowledgeError(VisionFMError, ValueError):
    """A knowledge file that cannot be used, or a class name that is not in it."""


def normalise_name(name: str) -> str:
    """Case-, space- and punctuation-insensitive key; British "oedema"/"haemorrhage" spellings match American ones."""
    text = str(name).strip().lower().replace("oedema", "edema").replace("haemorrh", "hemorrh")
    text = re.sub(r"[_\-]+", " ", text)
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text)).strip()


def fill_template(template: str, phrase: str) -> str:
    """Put a phrase into a template's ``[CLS]`` slot (abbreviations keep their case, other phrases start lower-case)."""
    phrase = phrase.strip().rstrip(".")
    if phrase and not phrase.split()[0].isupper():
        phrase = phrase[0].lower() + phrase[1:]
    return template.replace(PLACEHOLDER, phrase)


@dataclass(frozen=True)
class Category:
    """One finding or diagnosis: its key, names (the first is the display name) and descriptions per modality
    (``"common"`` applies to all)."""

    key: str
    names: Tuple[str, ...]
    descriptions: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]

    def descriptions_for(self, modality: str) -> List[str]:
        m = get_modality(modality).name
        return list(self.descriptions.get("common", ())) + list(self.descriptions.get(m, ()))

    def phrases(self, modality: str, descriptions: bool = True) -> List[str]:
        """Every name, then (optionally) every description for the modality, without duplicates."""
        out: List[str] = []
        seen = set()
        for text in list(self.names) + (self.descriptions_for(modality) if descriptions else []):
            key = normalise_name(text)
            if key not in seen:
                seen.add(key)
                out.append(text)
        return out


class KnowledgeBase:
    """Templates per modality and categories, loaded from a YAML file (see ``configs/knowledge/ophthalmology.yaml``).

    Args:
        templates: ``{modality or "default": [template, ...]}``; each template contains ``[CLS]``.
        categories: ``{key: Category}``.
        source: Where they came from (for error messages and metadata).
    """

    def __init__(self, templates: Mapping[str, Sequence[str]], categories: Mapping[str, Category],
                 source: str = "<memory>") -> None:
        self.templates = {k: list(v) for k, v in templates.items()}
        self.categories = dict(categories)
        self.source = source
        self.sha256: Optional[str] = None  # of the file, when loaded from one
        self._lookup: Dict[str, Category] = {}
        for cat in self.categories.values():
            self._index(cat)

    def _index(self, cat: Category) -> None:
        for text in (cat.key, *cat.names):
            key = normalise_name(text)
            other = self._lookup.get(key)
            if other is not None and other.key != cat.key:
                raise KnowledgeError(f"{self.source}: name {text!r} belongs to both {other.key!r} and {cat.key!r}")
            self._lookup[key] = cat

    def add(self, category: Category) -> None:
        """Add a category (for labels the file does not know); its key and names must be new."""
        if category.key in self.categories:
            raise KnowledgeError(f"category {category.key!r} already exists in {self.source}")
        self._index(category)
        self.categories[category.key] = category

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: "str | os.PathLike | None" = None) -> "KnowledgeBase":
        """Read and validate a knowledge YAML (default: :data:`DEFAULT_KNOWLEDGE`)."""
        path = Path(path or DEFAULT_KNOWLEDGE)
        try:
            data = load_yaml(path)  # the project's one YAML reader: missing file, bad YAML, non-mapping
        except ConfigError as err:
            raise KnowledgeError(f"knowledge file: {err}") from None
        if "templates" not in data or "categories" not in data:
            raise KnowledgeError(f"{path}: expected top-level 'templates' and 'categories' mappings")
        templates = data["templates"]
        if not isinstance(templates, dict) or "default" not in templates:
            raise KnowledgeError(f"{path}: 'templates' must be a mapping with at least a 'default' list")
        for mod, items in templates.items():
            if mod != "default":
                get_modality(mod)  # raises for an unknown modality
            if not isinstance(items, list) or not items:
                raise KnowledgeError(f"{path}: templates.{mod} must be a non-empty list")
            for t in items:
                if not isinstance(t, str) or PLACEHOLDER not in t:
                    raise KnowledgeError(f"{path}: template {t!r} (templates.{mod}) has no {PLACEHOLDER} slot")
        categories: Dict[str, Category] = {}
        for key, entry in (data["categories"] or {}).items():
            if not isinstance(entry, dict) or not entry.get("names"):
                raise KnowledgeError(f"{path}: category {key!r} needs a non-empty 'names' list")
            names = entry["names"]
            if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
                raise KnowledgeError(f"{path}: category {key!r}: 'names' must be a list of non-empty strings")
            raw = entry.get("descriptions") or {}
            if isinstance(raw, list):
                raw = {"common": raw}
            if not isinstance(raw, dict):
                raise KnowledgeError(f"{path}: category {key!r}: 'descriptions' must be a list or a mapping")
            descriptions: Dict[str, Tuple[str, ...]] = {}
            for mod, items in raw.items():
                mod_key = mod if mod == "common" else get_modality(mod).name
                if not isinstance(items, list) or not all(isinstance(d, str) and d.strip() for d in items):
                    raise KnowledgeError(f"{path}: category {key!r}: descriptions.{mod} must be a list of strings")
                descriptions[mod_key] = tuple(items)
            categories[str(key)] = Category(str(key), tuple(names), descriptions)
        if not categories:
            raise KnowledgeError(f"{path}: no categories")
        kb = cls(templates, categories, str(path))
        kb.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return kb

    # ------------------------------------------------------------------------------------------- lookup
    def find(self, name: str) -> Optional[Category]:
        """The category with this key or name (case/spelling-insensitive), or ``None``."""
        return self._lookup.get(normalise_name(name))

    def resolve(self, name: str) -> Category:
        """Like :meth:`find`, but an unknown name is an error listing the known categories."""
        cat = self.find(name)
        if cat is None:
            known = ", ".join(sorted(self.categories))
            raise KnowledgeError(f"{name!r} is not a category or name in {self.source}; known categories: {known}")
        return cat

    def templates_for(self, modality: str) -> List[str]:
        return list(self.templates.get(get_modality(modality).name, self.templates["default"]))

    # ------------------------------------------------------------------------------------------- text
    def caption(self, categories: Sequence[str], modality: str, rng: random.Random,
                description_prob: float = 0.5) -> str:
        """A training caption: a random template of the modality filled with, per category, a random name or (with
        ``description_prob``) a random description; several categories are joined with "and"."""
        if not categories:
            raise ValueError("a caption needs at least one category")
        parts = []
        for key in categories:
            cat = self.categories.get(key) or self.resolve(key)
            descriptions = cat.descriptions_for(modality)
            if descriptions and rng.random() < description_prob:
                parts.append(rng.choice(descriptions))
            else:
                parts.append(rng.choice(cat.names))
        template = rng.choice(self.templates_for(modality))
        return fill_template(template, " and ".join(p.strip().rstrip(".") for p in parts))

    def all_captions(self, categories: Sequence[str], modality: str) -> List[str]:
        """Every caption :meth:`caption` can produce for a single category (used to precompute text features)."""
        if len(categories) != 1:
            raise ValueError("all_captions enumerates single-category captions only")
        cat = self.categories.get(categories[0]) or self.resolve(categories[0])
        phrases = list(dict.fromkeys(list(cat.names) + cat.descriptions_for(modality)))
        return [fill_template(t, p) for t in self.templates_for(modality) for p in phrases]

    def class_prompts(self, class_name: str, modality: str, descriptions: bool = True) -> List[str]:
        """Zero-shot prompts for one class: every template of the modality filled with the class name as given and,
        where the name is a known category, all its names and (optionally) its descriptions."""
        cat = self.find(class_name)
        phrases = [class_name]
        if cat is not None:
            phrases += [p for p in cat.phrases(modality, descriptions)
                        if normalise_name(p) != normalise_name(class_name)]
        return [fill_template(t, p) for t in self.templates_for(modality) for p in phrases]
