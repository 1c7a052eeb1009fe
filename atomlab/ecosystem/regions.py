"""Which region each publisher on the Hub belongs to: the project's own table, from public facts.

The rule is the ATOM Project's: a publisher's region is where its primary base is (its headquarters,
or the institution that runs it), never inherited from the model it fine-tuned. Regions: us, china,
eu (Europe, Switzerland and the UK included), other, unknown (no single primary base). A CSV with
columns `hf_org,region` overrides or extends the table (`--regions FILE`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from atomlab.errors import AtomlabError

REGIONS = ("us", "china", "eu", "other", "unknown")

_BY_REGION = {
    "us": """agentica-org allenai amd answerdotai apple arcee-ai datalab-to deepcogito facebook FacebookAI
        fal google h2oai HuggingFaceFW HuggingFaceM4 HuggingFaceTB ibm-granite ibm-research LiquidAI llava-hf
        meta-llama microsoft moondream Nexusflow nomic-ai NousResearch nvidia open-r1 open-thoughts openai
        OpenHands openvla poolside PrimeIntellect RekaAI Salesforce ServiceNow-AI Snowflake state-spaces
        thinkingmachines vikhyatk xai-org zed-industries Zyphra""",
    "china": """01-ai AIDC-AI Alibaba-NLP ATH-MaaS BAAI baichuan-inc baidu ByteDance ByteDance-Seed deepseek-ai
        FireRedTeam GAIR GSAI-ML huawei-noah inclusionAI internlm jdopensource Kwaipilot meituan-longcat
        MiniMaxAI moonshotai openbmb opendatalab OpenGVLab PaddlePaddle PRIME-RL Qwen rednote-hilab sensenova
        Skywork stepfun-ai tencent THUDM Tongyi-MAI Wan-AI XiaomiMiMo Yi zai-org""",
    # Europe as a whole: Switzerland (swiss-ai, IBM Research Zurich's docling) and the UK (stabilityai) too
    "eu": """AI-MO black-forest-labs docling-project Freepik Hcompany JetBrains jinaai kyutai laion lightonai
        mistral-community mistralai Photoroom PleIAs stabilityai swiss-ai TildeAI tngtech vidore""",
    # Israel, Canada, Korea, Japan, the UAE, India, Singapore, Thailand
    "other": """ai21labs CohereForAI CohereLabs LGAI-EXAONE llm-jp LLM360 Motif-Technologies sarvamai skt tiiuae
        TinyLlama trillionlabs typhoon-ai upstage""",
    # collectives without one primary base
    "unknown": "allura-forge bigcode EleutherAI",
}
ORG_REGIONS: dict[str, str] = {org: region for region, orgs in _BY_REGION.items() for org in orgs.split()}

# Where this table and the ATOM Project's organization_regions.csv (commit 3cd8020) differ, and why.
# AI21 Labs is headquartered in Tel Aviv; the ATOM table puts it in the US. Pass the ATOM CSV with
# --regions to reproduce the ATOM figures exactly.
DISAGREEMENTS_WITH_ATOM = {"ai21labs": ("other", "us")}  # org: (this table, ATOM)


def load_regions(path: Path | None = None) -> dict[str, str]:
    """The table, with the rows of `path` (a CSV with hf_org,region columns) overriding or adding."""
    table = dict(ORG_REGIONS)
    if path is None:
        return table
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise AtomlabError(f"{path}: cannot read the region table ({exc.strerror})") from None
    for number, row in enumerate(rows, start=2):
        org, region = (row.get("hf_org") or "").strip(), (row.get("region") or "").strip().lower()
        if not org:
            raise AtomlabError(f"{path}: line {number}: no hf_org (columns: hf_org,region)")
        if region not in REGIONS:
            raise AtomlabError(f"{path}: line {number}: region {region!r} for {org}; use one of {', '.join(REGIONS)}")
        table[org] = region
    return table


def region_of(org: str, table: dict[str, str]) -> str:
    """The region of a publisher; namespaces are matched without regard to case, as the Hub does."""
    if org in table:
        return table[org]
    lowered = org.lower()
    return next((region for name, region in table.items() if name.lower() == lowered), "unknown")
