"""mkdocs hook: the spec field reference page is generated from the schema at build time (flowopd.spec.reference)."""

MARKER = "<!-- spec-field-reference -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    from flowopd.spec.reference import field_reference

    return markdown.replace(MARKER, field_reference())
