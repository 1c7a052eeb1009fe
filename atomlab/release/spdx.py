"""SPDX licence expressions, and which licences are open and fit for code, data or documentation.

The tables are facts: the SPDX License List (3.29) marks each licence OSI-approved and/or FSF
libre; the Model Openness Framework (MOF 1.0, LF AI & Data) counts a component as open when its
licence is one of those, or an open data or content licence (Creative Commons BY and BY-SA,
CC0, CDLA, ODC, ODbL, UK/Canada Open Government), or OpenMDW. The MOF also asks that the
licence fit the component's kind: a software licence for code, an open data licence for data
and parameters, an open content licence for documents.

Expressions follow SPDX: identifiers (case-insensitive), `+` (or later), `WITH exception`, `AND`,
`OR` and parentheses. `A AND B` is open when both are; `A OR B` when either is (the recipient
may choose); an exception only adds permissions, so `A WITH X` is open when `A` is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# SPDX License List 3.29: every identifier with isOsiApproved or isFsfLibre
FREE_SOFTWARE = frozenset(
    """
0BSD AAL AFL-1.1 AFL-1.2 AFL-2.0 AFL-2.1 AFL-3.0 AGPL-1.0 AGPL-3.0 AGPL-3.0-only AGPL-3.0-or-later ALGLIB-
Documentation APL-1.0 APSL-1.0 APSL-1.1 APSL-1.2 APSL-2.0 Apache-1.0 Apache-1.1 Apache-2.0 Artistic-1.0
Artistic-1.0-Perl Artistic-1.0-cl8 Artistic-2.0 BSD-1-Clause BSD-2-Clause BSD-2-Clause-FreeBSD BSD-2-Clause-
NetBSD BSD-2-Clause-Patent BSD-3-Clause BSD-3-Clause-Clear BSD-3-Clause-LBNL BSD-3-Clause-Open-MPI BSD-4-Clause
BSD-ask-to-endorse BSL-1.0 BitTorrent-1.1 BlueOak-1.0.0 CAL-1.0 CAL-1.0-Combined-Work-Exception CATOSL-1.1 CC-
BY-4.0 CC-BY-SA-4.0 CC0-1.0 CDDL-1.0 CDDL-1.1 CECILL-2.0 CECILL-2.1 CECILL-B CECILL-C CERN-OHL-P-2.0 CERN-
OHL-S-2.0 CERN-OHL-W-2.0 CNRI-Python CNRI-Python-GPL-Compatible CPAL-1.0 CPL-1.0 CUA-OPL-1.0 ClArtistic
Condor-1.1 ECL-1.0 ECL-2.0 EFL-1.0 EFL-2.0 EPL-1.0 EPL-2.0 EUDatagrid EUPL-1.1 EUPL-1.2 Entessa FSFAP FTL Fair
Frameworx-1.0 GFDL-1.1 GFDL-1.1-only GFDL-1.1-or-later GFDL-1.2 GFDL-1.2-only GFDL-1.2-or-later GFDL-1.3
GFDL-1.3-only GFDL-1.3-or-later GPL-2.0 GPL-2.0+ GPL-2.0-only GPL-2.0-or-later GPL-3.0 GPL-3.0+ GPL-3.0-only
GPL-3.0-or-later GPL-3.0-with-GCC-exception HPND ICU IJG IPA IPL-1.0 ISC Imlib2 Intel Jam LGPL-2.0 LGPL-2.0+
LGPL-2.0-only LGPL-2.0-or-later LGPL-2.1 LGPL-2.1+ LGPL-2.1-only LGPL-2.1-or-later LGPL-3.0 LGPL-3.0+
LGPL-3.0-only LGPL-3.0-or-later LPL-1.0 LPL-1.02 LPPL-1.2 LPPL-1.3a LPPL-1.3c LiLiQ-P-1.1 LiLiQ-R-1.1 LiLiQ-
Rplus-1.1 MIT MIT-0 MIT-Modern-Variant MPL-1.0 MPL-1.1 MPL-2.0 MPL-2.0-no-copyleft-exception MS-PL MS-RL MirOS
Motosoto MulanPSL-2.0 Multics NASA-1.3 NCSA NGPL NOSL NPL-1.0 NPL-1.1 NPOSL-3.0 NTP Naumen Nokia Nunit OCLC-2.0
ODbL-1.0 OFL-1.0 OFL-1.1 OFL-1.1-RFN OFL-1.1-no-RFN OGTSL OLDAP-2.3 OLDAP-2.7 OLDAP-2.8 OLFL-1.3 OSC-1.0 OSET-
PL-2.1 OSL-1.0 OSL-1.1 OSL-2.0 OSL-2.1 OSL-3.0 OpenSSL PHP-3.0 PHP-3.01 PostgreSQL Python-2.0 Python-2.0.1
QPL-1.0 RPL-1.1 RPL-1.5 RPSL-1.0 RSCPL Ruby SGI-B-2.0 SISSL SMLNJ SPL-1.0 SimPL-2.0 Sleepycat StandardML-NJ
UCL-1.0 UPL-1.0 Unicode-3.0 Unicode-DFS-2016 Unlicense VSL-1.0 Vim W3C W3C-20150513 WTFPL Watcom-1.0 WordNet X11
XFree86-1.1 Xnet YPL-1.1 ZPL-2.0 ZPL-2.1 Zend-2.0 Zimbra-1.3 Zlib curl eCos-2.0 gnuplot iMatix wxWindows xinetd
""".split()
)

# Open data and content licences named by the MOF and used in its tool, beyond the free software ones
OPEN_DATA = frozenset(
    """
CC0-1.0 CC-BY-1.0 CC-BY-2.0 CC-BY-2.5 CC-BY-2.5-AU CC-BY-3.0 CC-BY-3.0-AT CC-BY-3.0-AU CC-BY-3.0-DE CC-BY-3.0-IGO
CC-BY-3.0-NL CC-BY-3.0-US CC-BY-4.0 CC-BY-SA-1.0 CC-BY-SA-2.0 CC-BY-SA-2.0-UK CC-BY-SA-2.1-JP CC-BY-SA-2.5
CC-BY-SA-3.0 CC-BY-SA-3.0-AT CC-BY-SA-4.0 CDLA-Permissive-1.0 CDLA-Permissive-2.0 CDLA-Sharing-1.0 ODC-By-1.0
ODbL-1.0 PDDL-1.0 OGL-Canada-2.0 OGL-UK-2.0 OGL-UK-3.0 GFDL-1.3
""".split()
)
OPEN_ANY_KIND = frozenset({"OpenMDW-1.0"})  # written for models: code, data and documents alike

# What each open licence fits (MOF 1.0): data and documents take open content licences; code takes
# free software licences. Apache-2.0 is also accepted for documents by the MOF tool.
FIT_FOR_DATA = OPEN_DATA
FIT_FOR_DOCUMENTS = {lic for lic in OPEN_DATA | FREE_SOFTWARE if lic.startswith(("CC-BY", "CC0", "GFDL"))} | {
    "Apache-2.0"
}

_LOWER = {lic.lower(): lic for lic in FREE_SOFTWARE | OPEN_DATA | OPEN_ANY_KIND | FIT_FOR_DATA | FIT_FOR_DOCUMENTS}
_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z0-9.+:-]+)")


@dataclass(frozen=True)
class License:
    """One licence (`id`, with `or_later` for `+` and an optional exception) or an AND/OR of parts."""

    id: str = ""
    exception: str = ""
    operator: str = ""  # "AND" / "OR" for compound expressions
    parts: tuple[License, ...] = ()

    def __str__(self) -> str:
        if self.operator:
            return f" {self.operator} ".join(f"({p})" if p.operator else str(p) for p in self.parts)
        return self.id + (f" WITH {self.exception}" if self.exception else "")

    def leaves(self) -> list[License]:
        return [self] if not self.operator else [leaf for p in self.parts for leaf in p.leaves()]


class NotSPDX(ValueError):
    """The text is not an SPDX licence expression."""


def parse(text: str) -> License:
    """An SPDX expression, with identifiers spelled as SPDX spells them; raises NotSPDX."""
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or not match.group(1):
            raise NotSPDX(f"{text!r}: unexpected {text[position:].strip()[:20]!r}")
        tokens.append(match.group(1))
        position = match.end()
    if not tokens:
        raise NotSPDX("empty licence")
    expression, rest = _parse_or(tokens)
    if rest:
        raise NotSPDX(f"{text!r}: unexpected {' '.join(rest)!r}")
    return expression


def _parse_or(tokens: list[str]) -> tuple[License, list[str]]:
    return _parse_binary(tokens, "OR", _parse_and)


def _parse_and(tokens: list[str]) -> tuple[License, list[str]]:
    return _parse_binary(tokens, "AND", _parse_atom)


def _parse_binary(tokens: list[str], operator: str, operand) -> tuple[License, list[str]]:
    parts = []
    part, tokens = operand(tokens)
    parts.append(part)
    while tokens and tokens[0].upper() == operator:
        part, tokens = operand(tokens[1:])
        parts.append(part)
    return (parts[0] if len(parts) == 1 else License(operator=operator, parts=tuple(parts))), tokens


def _parse_atom(tokens: list[str]) -> tuple[License, list[str]]:
    if not tokens:
        raise NotSPDX("expression ends early")
    head, tokens = tokens[0], tokens[1:]
    if head == "(":
        inner, tokens = _parse_or(tokens)
        if not tokens or tokens[0] != ")":
            raise NotSPDX("unbalanced parenthesis")
        return inner, tokens[1:]
    if head == ")" or head.upper() in ("AND", "OR", "WITH"):
        raise NotSPDX(f"unexpected {head!r}")
    identifier = _LOWER.get(head.lower(), _LOWER.get(head.lower().removesuffix("+"), head))
    if head.endswith("+") and not identifier.endswith("+"):
        identifier += "+"
    exception = ""
    if tokens and tokens[0].upper() == "WITH":
        if len(tokens) < 2 or tokens[1] in "()":
            raise NotSPDX("WITH needs an exception identifier")
        exception, tokens = tokens[1], tokens[2:]
    return License(id=identifier, exception=exception), tokens


def _base(identifier: str) -> str:
    return identifier.removesuffix("+")


def is_open(lic: License) -> bool:
    """Open in the MOF's sense: free software, open data or content, or OpenMDW."""
    if lic.operator == "AND":
        return all(is_open(p) for p in lic.parts)
    if lic.operator == "OR":
        return any(is_open(p) for p in lic.parts)
    return _base(lic.id) in FREE_SOFTWARE | OPEN_DATA | OPEN_ANY_KIND


def fits(lic: License, kind: str) -> bool:
    """Whether an open licence suits a component of this kind (code, data or document)."""
    if lic.operator == "AND":
        return all(fits(p, kind) for p in lic.parts)
    if lic.operator == "OR":
        return any(fits(p, kind) and is_open(p) for p in lic.parts)
    base = _base(lic.id)
    if base in OPEN_ANY_KIND:
        return True
    if kind == "data":
        return base in FIT_FOR_DATA
    if kind == "document":
        return base in FIT_FOR_DOCUMENTS
    return base in FREE_SOFTWARE and base not in OPEN_DATA


def suggest(kind: str) -> str:
    """A licence to suggest for a component of this kind."""
    return {"code": "Apache-2.0", "data": "CDLA-Permissive-2.0 or CC-BY-4.0", "document": "CC-BY-4.0"}[kind]
