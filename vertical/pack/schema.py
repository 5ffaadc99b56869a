"""Typed schema of a pack: pack.yaml and the records of its data files.

Every model forbids unknown fields, so a misspelt key is reported instead of silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vertical.models.registry import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER

SUPPORTED_DOCUMENT_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf", ".docx", ".jsonl")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EditHyperParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # where: ROME edits `layer`; MEMIT spreads a batch over `layers`; "auto" = from a causal trace
    layer: int | Literal["auto"] = "auto"
    layers: list[int] | Literal["auto"] = "auto"
    memit_span: int = Field(5, ge=1, description="layers MEMIT uses around the traced layer when layers is auto")
    # the target vector: gradient steps on a delta added at the last subject token
    v_steps: int = Field(25, ge=1, le=500)
    v_lr: float = Field(0.5, gt=0)
    v_weight_decay: float = Field(0.5, ge=0)
    kl_factor: float = Field(0.0625, ge=0)
    clamp_norm_factor: float = Field(4.0, gt=0)
    context_templates: int = Field(5, ge=0, le=50, description="random prefixes the edit must hold under")
    context_tokens: int = Field(10, ge=2, le=40)
    # protecting other knowledge: second moment of FFN keys, from pack documents + generic text
    mom2: Literal["stats", "identity"] = "stats"
    mom2_tokens: int = Field(20000, ge=1000, description="tokens of text for the key statistics")
    mom2_update_weight: float = Field(15000.0, gt=0, description="MEMIT's lambda on the key covariance")
    # AlphaEdit: how much of the preserved keys' energy the update may touch, and its ridge
    null_space_energy: float = Field(0.05, gt=0, le=1, description="share of the key second moment, smallest "
                                     "directions first, that spans the null space AlphaEdit writes into")
    alphaedit_ridge: float = Field(0.1, gt=0, description="ridge, relative to the mean diagonal of P K K^T")
    # fine-tuning baseline
    ft_steps: int = Field(25, ge=1)
    ft_lr: float = Field(5e-4, gt=0)
    ft_norm_constraint: float = Field(5e-4, ge=0, description="max change of any weight entry (L-inf)")
    seed: int = 0


    @field_validator("layers")
    @classmethod
    def _increasing(cls, value):
        # MEMIT targets the last listed layer and spreads the change over the ones below it
        if isinstance(value, list) and (not value or any(b <= a for a, b in zip(value, value[1:]))):
            raise ValueError("layers must be a non-empty list of increasing layer numbers, e.g. [4, 5, 6, 7, 8]")
        return value


# ---------------------------------------------------------------- pack.yaml


class IndexSettings(Strict):
    """Retrieval index: how documents are cut into chunks and how they are searched."""

    chunk_tokens: int = Field(128, ge=32, le=512, description="chunk size in embedder tokens: smaller "
                              "chunks make shorter retrieval prompts (see docs/retrieval.md)")
    chunk_overlap: int = Field(24, ge=0, le=256, description="tokens shared by neighbouring chunks")
    retrieval: Literal["auto", "dense", "bm25", "hybrid"] = Field(
        "auto", description="search mode; auto keeps whichever scores best on the retrieval eval set")
    top_k: int = Field(4, ge=1, le=20, description="chunks retrieved for a question")
    evidence_sentences: int = Field(5, ge=0, le=20, description="sentences of the retrieved chunks the model reads, "
                                    "chosen by similarity to the question (0: the whole chunks)")
    backend: Literal["faiss", "qdrant"] = Field("faiss", description="vector store for dense search: FAISS in the "
                                                "process, or Qdrant (embedded, or a server with qdrant_url)")
    qdrant_url: str | None = Field(None, description="Qdrant server or cluster URL (API key from QDRANT_API_KEY); "
                                   "null: Qdrant embedded in the process")

    @model_validator(mode="after")
    def _overlap_smaller_than_chunk(self) -> "IndexSettings":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return self


class TuneSettings(Strict):
    """LoRA fine-tuning. Values left out (null) are chosen from the base model's size."""

    lora_rank: int | None = Field(None, ge=1, le=256)
    lora_alpha: int | None = Field(None, ge=1, le=512)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    lora_layers: float = Field(0.67, gt=0, le=1, description="share of the decoder layers, counted from the top, "
                               "that get adapters: below the lowest adapted layer nothing is back-propagated (legal, "
                               "SmolLM2-135M in fp32: 20 of 30 layers trained in 239 s instead of 309)")
    learning_rate: float | None = Field(None, gt=0, lt=1)
    epochs: float = Field(1.0, gt=0, le=20)
    max_length: int = Field(512, ge=32, le=32768, description="tokens; retrieved sources are shortened to fit, other long examples truncated")
    batch_size: int = Field(4, ge=1, le=512)
    gradient_accumulation: int = Field(2, ge=1, le=512)
    max_examples: int | None = Field(96, ge=1, description="cap on training examples (null: all), shared evenly between the instruction files (one smaller than its share gives all it has); sized for ~10 min on 2 CPU cores")
    generated_questions: int = Field(96, ge=0, le=2000, description="training examples generated from the documents "
                                     "(a fact of a sentence, a template question, the exact span as the answer), on "
                                     "top of max_examples; a pack without qa_eval holds out 30 more to be scored on")
    rag_fraction: float = Field(0.9, ge=0, le=1, description="share of examples given retrieved evidence (every "
                                "answer the product gives reads evidence; the rest teach answering from memory)")
    no_answer_fraction: float = Field(0.1, ge=0, le=1, description="share of extra examples with unrelated sources")
    rag_sources: int = Field(4, ge=1, le=10, description="chunks retrieved per training example and "
                             "scored question (their evidence sentences are what the model reads)")
    eval_holdout: int = Field(16, ge=0, description="instruction examples held out for eval loss")
    eval_questions: int = Field(20, ge=0, description="QA items scored for base vs tuned (0: none), from the eval stage's sample")
    save_steps: int = Field(20, ge=1, description="checkpoint every N optimizer steps (resume after a kill)")
    seed: int = 0


class EditSettings(Strict):
    """Knowledge editing of the pack's edits; `hparams` overrides the model's tuned values."""

    method: Literal["rome", "memit", "alphaedit", "ft"] = "rome"
    hparams: EditHyperParams = Field(default_factory=EditHyperParams)


class DistillSettings(Strict):
    """A smaller student of the same family, initialised from the teacher's layers, trained to match it."""

    keep_layers: float = Field(0.4, gt=0, le=1, description="fraction of the teacher's layers the student keeps (0.4: 12 of 30; the layout is chosen on pack text). 10 of 30 decodes faster but kept only 0.88 of the medical teacher's QA score, its int8 bundle 0.72")
    temperature: float = Field(2.0, gt=0, le=20, description="softens both distributions for the token-level KL")
    steps: int | None = Field(None, ge=0, description="optimizer steps; unset: 40 where a GPU trains the student "
                                                      "or a teacher is named, and none on a CPU, where no student "
                                                      "keeps min_retention at a speed worth its minutes "
                                                      "(docs/distill.md), so the stage is skipped; set it to distil "
                                                      "on a CPU anyway (0: no student). With stages.export.model "
                                                      "auto, a student below half of min_retention halfway stops there")
    batch_size: int = Field(4, ge=1, le=512)
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="AdamW peak rate (warmup, then cosine decay)")
    max_length: int = Field(512, ge=32, le=32768, description="tokens per training sequence (retrieved sources are shortened to fit, as in tune)")
    teacher_answers: int = Field(16, ge=0, description="pack prompts the teacher answers for sequence-level distillation "
                                 "(each costs a greedy generation of up to answer_tokens)")
    answer_tokens: int = Field(96, ge=8, le=2048, description="longest teacher answer generated")
    documents: int = Field(64, ge=0, description="document chunks used as plain text for token-level distillation")
    seed: int = 0
    teacher: str | None = Field(None, description="a larger model of the same tokenizer to learn from (registry name, "
                                                  "HF folder or .gguf, e.g. one tuned on a GPU); the build's own model, "
                                                  "before its edits, is then the student, whole. Unset: the build's model "
                                                  "teaches a student with keep_layers of its layers")


class ExportSettings(Strict):
    """The ONNX bundle: which model goes in and how its weights are stored."""

    model: Literal["auto", "student", "teacher"] = Field(
        "auto", description="auto: the student if it keeps at least min_retention of the teacher's QA score, "
                            "else the teacher; student: the student whenever there is one; teacher")
    min_retention: float = Field(0.9, ge=0, le=1, description="the share of the teacher's score (on the eval stage's "
                                                              "QA sample) the student must keep to be exported by auto")
    quant: Literal["auto", "int4", "int8", "fp32"] = Field(
        "auto", description="auto: int8; for models of 1B parameters or more, int4 if it agrees better with fp32 "
                            "on the pack's prompts")
    agreement_prompts: int = Field(8, ge=1, le=200, description="pack prompts used to compare quantisations")
    vocabulary: Literal["pack", "full"] = Field(
        "pack", description="pack: the model keeps only the tokens the pack's documents, instructions, edits and "
                            "generated questions use, plus the commonest general ones (a smaller, faster model that "
                            "still reads any text); full: the base model's whole vocabulary")


class EvalSettings(Strict):
    """The eval stage's report: which items, how long the answers."""

    questions: int = Field(40, ge=0, description="QA items scored per model, a seeded sample keeping the mix of "
                                                 "choice and short-answer items (0: all); 40 keeps the stage near "
                                                 "5 min on 2 CPU cores")
    answer_tokens: int = Field(64, ge=4, le=512, description="longest generated answer for short-answer items; an "
                               "answer ends sooner where `vertical ask` stops it (a repeat, or two sentences), so "
                               "this cap binds only an answer that runs on")
    seed: int = 0


class StageSettings(Strict):
    index: IndexSettings = IndexSettings()
    tune: TuneSettings = TuneSettings()
    edit: EditSettings = EditSettings()
    distill: DistillSettings = DistillSettings()
    export: ExportSettings = ExportSettings()
    eval: EvalSettings = EvalSettings()


class DataFiles(Strict):
    """Paths relative to the pack folder."""

    documents: list[str] = Field(default_factory=lambda: ["documents"], description="folders or files of documents")
    instructions: list[str] = Field(default_factory=list, description="instruction JSONL (alpaca or sharegpt)")
    edits: list[str] = Field(default_factory=list, description="knowledge-edit JSONL (EasyEdit fields)")
    qa_eval: list[str] = Field(default_factory=list, description="QA evaluation JSONL")
    retrieval_eval: list[str] = Field(default_factory=list, description="retrieval evaluation JSONL (question, doc_id)")

    @field_validator("documents", "instructions", "edits", "qa_eval", "retrieval_eval")
    @classmethod
    def _inside_the_pack(cls, paths: list[str]) -> list[str]:
        """A pack is one folder: a data path may not leave it (absolute, ~ or ..)."""
        for path in paths:
            parts = path.replace("\\", "/").split("/")
            if path.startswith(("/", "~")) or ":" in parts[0] or ".." in parts:
                raise ValueError(f"'{path}' points outside the pack; give a path relative to the pack folder, "
                                 "without '..' (copy the files into the pack)")
        return paths


class PackConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="lowercase letters, digits, - and _")
    description: str = Field(min_length=1)
    language: str = "en"
    base_model: str = DEFAULT_BASE_MODEL
    embedder: str = DEFAULT_EMBEDDER
    system_prompt: str = Field(min_length=1)
    disclaimer: str = ""
    example_questions: list[str] = Field(default_factory=list)
    data: DataFiles = DataFiles()
    stages: StageSettings = StageSettings()


# ---------------------------------------------------------------- data records


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class AlpacaExample(Strict):
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)
    system: str | None = None
    history: list[tuple[str, str]] = Field(default_factory=list)

    def to_messages(self) -> list[Message]:
        messages = [Message(role="system", content=self.system)] if self.system else []
        for user, assistant in self.history:
            messages += [Message(role="user", content=user), Message(role="assistant", content=assistant)]
        prompt = f"{self.instruction}\n\n{self.input}" if self.input else self.instruction
        return messages + [Message(role="user", content=prompt), Message(role="assistant", content=self.output)]


class ShareGPTTurn(Strict):
    from_: Literal["system", "human", "user", "gpt", "assistant"] = Field(alias="from")
    value: str


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ShareGPTExample(Strict):
    conversations: list[ShareGPTTurn] = Field(min_length=2)
    system: str | None = None

    @model_validator(mode="after")
    def _ends_with_assistant(self) -> "ShareGPTExample":
        if _SHAREGPT_ROLES[self.conversations[-1].from_] != "assistant":
            raise ValueError("the last turn of `conversations` must be from gpt/assistant")
        return self

    def to_messages(self) -> list[Message]:
        messages = [Message(role="system", content=self.system)] if self.system else []
        return messages + [Message(role=_SHAREGPT_ROLES[t.from_], content=t.value) for t in self.conversations]


class LocalityPrompt(Strict):
    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1)


class DocumentChange(Strict):
    """What an edit changes in a document, so that retrieval and the edited weights say the same:
    the passage `old` (as the document has it now) replaced by `new`, or the document's whole new `text`."""

    doc_id: str = Field(min_length=1)
    old: str | None = Field(None, min_length=1)
    new: str | None = None
    text: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind_of_change(self) -> "DocumentChange":
        passage = self.old is not None or self.new is not None
        if (self.text is not None and passage) or (self.text is None and (self.old is None or self.new is None)):
            raise ValueError("give `old` and `new` (a passage replaced), or `text` (the whole new document)")
        return self


def _one(value):
    """EasyEdit writes some single values as one-element lists."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _prompt_targets(value) -> list[dict]:
    """EasyEdit's prompt sets as [{"prompt", "target"}]: a list of {"prompt", "ground_truth" | "target"},
    or a dict of such lists (or of {"prompt": [..], "ground_truth": [..]}) by name."""
    if isinstance(value, dict):
        if "prompt" in value:
            prompts, truths = value["prompt"], value.get("ground_truth", value.get("target"))
            if isinstance(prompts, list):
                return [{"prompt": p, "target": _one(t)} for p, t in zip(prompts, truths or [])]
            return [{"prompt": prompts, "target": _one(truths)}]
        return [item for group in value.values() for item in _prompt_targets(group)]
    if isinstance(value, list):
        return [{"prompt": item.get("prompt"), "target": _one(item.get("target", item.get("ground_truth")))}
                if isinstance(item, dict) else item for item in value]
    return value


class EditRequest(Strict):
    """One knowledge edit: `prompt` + `target_new` is the new fact; `document`: the same change in the
    documents (one change or a list, for a fact that several documents state; vertical.edit applies
    all of them with the weights). EasyEdit's files are read too: CounterFact's
    `ground_truth`, `rephrase_prompt`, `locality_prompt` / `locality_ground_truth`, `case_id`;
    zsRE's `src`, `alt`, `answers`, `loc`, `loc_ans`; and `portability` prompts."""

    id: str | None = None
    prompt: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    target_new: str = Field(min_length=1)
    target_true: str | None = None
    rephrase: list[str] = Field(default_factory=list)
    locality: list[LocalityPrompt] = Field(default_factory=list)
    portability: list[LocalityPrompt] = Field(default_factory=list)  # consequences of the new fact that should follow
    document: list[DocumentChange] = Field(default_factory=list)

    @field_validator("document", mode="before")
    @classmethod
    def _one_change_is_a_list(cls, value):
        return [] if value is None else [value] if isinstance(value, dict) else value

    @model_validator(mode="before")
    @classmethod
    def _easyedit_fields(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        renames = {"case_id": "id", "ground_truth": "target_true", "rephrase_prompt": "rephrase", "src": "prompt",
                   "alt": "target_new", "answers": "target_true"}
        for easyedit, ours in renames.items():
            if easyedit in data and ours not in data:
                data[ours] = _one(data.pop(easyedit))
        if data.get("id") is not None:
            data["id"] = str(data["id"])
        for prompt_key, target_key in (("locality_prompt", "locality_ground_truth"), ("loc", "loc_ans")):
            if prompt_key in data:
                extra = {"prompt": data.pop(prompt_key), "target": _one(data.pop(target_key, None))}
                data["locality"] = [*_prompt_targets(data.get("locality", [])), extra]
        for key in ("locality", "portability"):
            if key in data:
                data[key] = _prompt_targets(data[key])
        return data

    @field_validator("rephrase", mode="before")
    @classmethod
    def _one_rephrase_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> "EditRequest":
        if self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        return self


class QAItem(Strict):
    """A question with a short answer, or a multiple-choice question (`label` is a choice or its index)."""

    id: str | None = None
    question: str = Field(min_length=1)
    answer: str | None = None
    choices: list[str] | None = None
    label: str | int | None = None
    context: str | None = None
    doc_id: str | None = None

    @model_validator(mode="after")
    def _answer_or_choices(self) -> "QAItem":
        if self.choices is None:
            if not self.answer:
                raise ValueError("give `answer`, or `choices` and `label`")
            return self
        if self.label is None:
            raise ValueError("`choices` needs a `label` (one of the choices or its index)")
        if isinstance(self.label, int):
            if not 0 <= self.label < len(self.choices):
                raise ValueError(f"label index {self.label} is outside choices (0..{len(self.choices) - 1})")
        elif self.label not in self.choices:
            raise ValueError(f"label {self.label!r} is not one of choices {self.choices}")
        return self

    @property
    def gold(self) -> str:
        if self.choices is None:
            return self.answer or ""
        return self.choices[self.label] if isinstance(self.label, int) else str(self.label)


class RetrievalItem(Strict):
    question: str = Field(min_length=1)
    doc_id: str = Field(min_length=1)
    id: str | None = None
    answer: str | None = None


class DocumentRecord(Strict):
    """One document in a documents .jsonl file."""

    id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    title: str | None = None
    source: str | None = None
    metadata: dict = Field(default_factory=dict)
