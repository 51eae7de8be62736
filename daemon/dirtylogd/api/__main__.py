"""``python -m dirtylogd.api > docs/protocol.md``: the protocol reference, from the table."""

from dirtylogd.api.introspect import render_markdown
from dirtylogd.api.schema import COMMANDS, EVENTS

print(render_markdown(COMMANDS, EVENTS), end="")
