# The report's landing page (workflow/report/workflow.rst) shows each experiment's plots. docutils'
# HTML writer that Snakemake uses links images by path, which breaks once the report is opened
# anywhere else; the `embeddedplot` directive puts each image's bytes in the page instead. Defined
# only for `snakemake --report`: docutils takes ~0.1 s to import, which every other run would pay.
if any(argument == "--report" or argument.startswith("--report=") for argument in sys.argv):
    import base64
    import mimetypes

    from docutils.parsers.rst import directives
    from docutils.parsers.rst.directives.images import Image

    class EmbeddedPlot(Image):
        """``.. embeddedplot:: <path>``: docutils' ``image`` with the file as a data URI."""

        def run(self):
            path = Path(directives.uri(self.arguments[0]))
            media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.arguments[0] = f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"
            return super().run()

    directives.register_directive("embeddedplot", EmbeddedPlot)
