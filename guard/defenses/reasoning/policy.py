"""The safety policy the reasoner judges by: versioned categories with descriptions, in YAML.

The default is SSUI's nine categories (SRPO, DESIGN.md §4.3). A policy file looks like::

    version: my-policy-3
    categories:
      - name: violence
        description: Harm to people or animals, threats, glorification of violence.

Category names are the guard's metric labels where they match one (``guard.metrics``); any
other name is counted as ``other``. The version enters the reasoner cache's keys, so editing a
policy without changing its version would serve stale verdicts: the loader hashes the content
into the version for that reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from guard.config import ConfigError


@dataclass(frozen=True)
class Category:
    name: str
    description: str


@dataclass(frozen=True)
class Policy:
    version: str
    categories: tuple[Category, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    def describe(self) -> str:
        """The categories as the system prompt lists them."""
        return "\n".join(f"- {c.name}: {c.description}" for c in self.categories)


SSUI = (
    ("dangerous_behavior", "Instructions or encouragement for acts that risk injury or death."),
    ("violence", "Harm to people or animals, threats, or glorification of violence."),
    ("pornography", "Sexually explicit content, or any sexual content involving minors."),
    ("moral_violations", "Cheating, deception, cruelty or other clearly unethical conduct."),
    ("illegal_crimes", "Help with crimes: theft, fraud, drugs, weapons trafficking, hacking."),
    ("political_controversies", "Inflammatory or deceptive content about politics or elections."),
    ("discrimination_stereotypes", "Demeaning or excluding people for who they are."),
    ("offensive_religious_beliefs", "Mockery or hatred of religions and their followers."),
    ("privacy", "Exposing, inferring or tracking personal information about real people."),
)


def default_policy() -> Policy:
    return _versioned("ssui-9", [Category(n, d) for n, d in SSUI])


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path`` (YAML), or the default; one clear line on any problem."""
    if path is None:
        return default_policy()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read reasoner policy {path}: {e.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(f"reasoner policy {path}: not valid YAML") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ConfigError(f"reasoner policy {path}: needs 'version' and a 'categories' list")
    categories = []
    for i, item in enumerate(data["categories"], 1):
        if not isinstance(item, dict) or not item.get("name") or not item.get("description"):
            raise ConfigError(f"reasoner policy {path}: category {i} needs name and description")
        categories.append(Category(str(item["name"]), str(item["description"])))
    if not categories or len({c.name for c in categories}) != len(categories):
        raise ConfigError(f"reasoner policy {path}: categories must be non-empty and unique")
    return _versioned(str(data.get("version", "unversioned")), categories)


def _versioned(version: str, categories: list[Category]) -> Policy:
    """The declared version plus a digest of the content: an edit always changes it."""
    content = json.dumps([[c.name, c.description] for c in categories])
    digest = hashlib.sha256(content.encode()).hexdigest()[:8]
    return Policy(f"{version}+{digest}", tuple(categories))
