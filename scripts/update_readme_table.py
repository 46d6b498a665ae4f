"""Regenerate the methods table in README.md from the registry (the docs table reads the registry)."""

import re
from pathlib import Path

from hf_decoding_ext.registry import markdown_table

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
new = re.sub(r"(<!-- registry-table:start -->\n).*?(<!-- registry-table:end -->)",
             lambda m: m.group(1) + markdown_table() + "\n" + m.group(2), text, flags=re.S)
readme.write_text(new)
print("README table updated")
