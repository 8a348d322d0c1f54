"""``config-keys``: the table of a kind's config keys, built from
:data:`jaxsoftmax_experiments.config.TABLE` (the same table ``--help`` prints and
validation checks), so the reference cannot drift from the code."""

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _cell(text: str, literal: bool = False) -> nodes.entry:
  entry = nodes.entry()
  para = nodes.paragraph()
  para += nodes.literal(text=text) if literal else nodes.Text(text)
  entry += para
  return entry


class ConfigKeys(SphinxDirective):
  required_arguments = 1  # the kind

  def run(self):
    from jaxsoftmax_experiments import config

    kind = self.arguments[0]
    if kind not in config.TABLE:
      raise self.error(f"config-keys: unknown kind {kind!r}; kinds: {', '.join(config.KINDS)}")
    table = nodes.table(classes=["config-keys"])
    group = nodes.tgroup(cols=4)
    table += group
    for width in (18, 14, 48, 20):
      group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    row = nodes.row()
    for title in ("key", "default", "meaning", "accepted"):
      row += _cell(title)
    head += row
    group += head
    body = nodes.tbody()
    for key, (default, meaning, _, accepted) in config.TABLE[kind].items():
      row = nodes.row()
      row += _cell(f"config.{key}", literal=True)
      row += _cell(repr(default), literal=True)
      row += _cell(meaning)
      row += _cell(accepted)
      body += row
    group += body
    return [table]


def setup(app):
  app.add_directive("config-keys", ConfigKeys)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
