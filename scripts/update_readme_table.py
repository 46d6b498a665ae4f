"""Regenerate the methods table in README.md from the registry (the docs table reads the registry): the legend of
the status and effect columns and the table, between the registry-table markers (:func:`registry.readme_block`)."""

import re
from pathlib import Path

from hf_decoding_ext.registry import readme_block

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
new = re.sub(r"(<!-- registry-table:start -->\n).*?(<!-- registry-table:end -->)",
             lambda m: m.group(1) + readme_block() + m.group(2), text, flags=re.S)
readme.write_text(new)
print("README table updated")
