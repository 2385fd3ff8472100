"""`show_doc` cards as fastai's docs draw them: nbdev 3's signature card, then a table of the documented arguments.
Named as the renderer in pyproject.toml's `[tool.nbdev]`; used only when the docs are built (it needs nbdev)."""
from nbdev.showdoc import BasicMarkdownRenderer, DocmentTbl

class TableRenderer(BasicMarkdownRenderer):
    "nbdev's markdown card with a Type/Default/Details table of the arguments, when it has any"
    def _repr_markdown_(self):
        md = super()._repr_markdown_()
        try: tbl = DocmentTbl(self.sym)._repr_markdown_()
        except Exception: tbl = ''
        return md + (f"\n\n{tbl}" if tbl and '| **Details** |' in tbl and tbl.count('\n') > 1 else '')
