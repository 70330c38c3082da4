"""Checks that every relative link and image in README.md and docs/*.md resolves.

    python docs/check_links.py          # prints each broken link; exit status 1 if any

A link ``[text](target)`` or image ``![alt](target)`` whose target is not a URL
(``http:``, ``https:``, ``mailto:``) must name a file or folder of the repository,
relative to the Markdown file; a ``#fragment`` must match a heading of the target
Markdown file (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens).
Links inside code blocks and inline code are ignored. ``broken_links()`` returns the
problems as strings, for a test to assert on.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files(root=ROOT):
    """README.md and every Markdown file under docs/, sorted."""
    files = [os.path.join(root, "README.md")]
    for folder, _, names in os.walk(os.path.join(root, "docs")):
        files += [os.path.join(folder, n) for n in names if n.endswith(".md")]
    return sorted(f for f in files if os.path.isfile(f))


def _prose(text):
    """``text`` without fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path):
    """The heading anchors GitHub gives the Markdown file at ``path``."""
    with open(path, encoding="utf-8") as f:
        text = _prose(f.read())
    seen = {}
    result = set()
    for line in text.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(root=ROOT):
    """Every link of :func:`markdown_files` that does not resolve, as
    ``"file: target (why)"`` strings."""
    problems = []
    for path in markdown_files(root):
        with open(path, encoding="utf-8") as f:
            text = _prose(f.read())
        where = os.path.relpath(path, root)
        for target in LINK.findall(text):
            if target.startswith(EXTERNAL):
                continue
            file_part, _, fragment = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if file_part and not os.path.exists(resolved):
                problems.append(f"{where}: {target} (no such file)")
                continue
            if fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
                problems.append(f"{where}: {target} (no heading #{fragment})")
    return problems


def main():
    problems = broken_links()
    for problem in problems:
        print(problem)
    checked = len(markdown_files())
    print(f"{checked} Markdown files checked, {len(problems)} broken links", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
