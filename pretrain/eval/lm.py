"""lm-eval adapter: a GPT of this framework, in memory, as an ``lm_eval.api.model.LM``.

Scores exactly what lm-eval's ``hf`` model scores on the exported GPT2LMHeadModel: the same
tokens (the run's tokenizer; the export's HF tokenizer has identical ids), the same
context/continuation split (``TemplateLM._encode_pair``), the same left truncation to the model's
positions, the same rolling windows for perplexity, and the same prefix token for an empty
context (the end-of-document token the model was trained with: </s>, or GPT-2's <|endoftext|>;
the export's tokenizer names it as its bos, the token lm-eval's ``hf`` model prefixes with).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM


class MegatronGPTLM(TemplateLM):
    """``MegatronGPTLM(model, tokenizer)``: ``model`` a (TP=1) MegatronGPT, ``tokenizer`` the run's
    (``pretrain.data.tokenizer.load_tokenizer``: sentencepiece or Hugging Face). ``batch_size``
    sequences of equal length are scored together."""

    def __init__(self, model, tokenizer, batch_size: int = 8, device: str = "cpu", max_length: Optional[int] = None):
        super().__init__()
        self.model = model.eval()
        self.sp = tokenizer
        self.batch_size = int(batch_size)
        self._device = torch.device(device)
        self._max_length = int(max_length or model.model_config.seq_length)

    # -- TemplateLM ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.sp.eos

    @property
    def prefix_token_id(self) -> int:
        return self.sp.eos  # the end-of-document token, as the export's bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.sp.model_path

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        return self.sp.tokenize(string)

    @torch.no_grad()
    def _logprobs(self, inputs: List[List[int]]) -> List[torch.Tensor]:
        """Log-softmax over the vocabulary for each input sequence ([len, V] each)."""
        from pretrain.models import gpt_logits

        out = []
        # group equal lengths so no padding is needed (padding changes nothing causal, but this
        # keeps the arithmetic identical to a batch of one)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        results = [None] * len(inputs)
        i = 0
        while i < len(order):
            n = len(inputs[order[i]])
            group = [order[i]]
            while i + len(group) < len(order) and len(group) < self.batch_size and len(inputs[order[i + len(group)]]) == n:
                group.append(order[i + len(group)])
            toks = torch.tensor([inputs[g] for g in group], dtype=torch.long, device=self._device)
            logp = F.log_softmax(gpt_logits(self.model, toks).float(), dim=-1)
            for row, g in enumerate(group):
                results[g] = logp[row].cpu()
            i += len(group)
        out.extend(results)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        inputs, conts = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError("empty context/continuation or continuation longer than the model's positions")
            # as lm-eval's HFLM: keep the last max_length+1 tokens, feed all but the last
            inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
            inputs.append(inp)
            conts.append(continuation_enc)
        res = []
        for logp, cont in zip(self._logprobs(inputs), conts):
            tail = logp[-len(cont):]
            target = torch.tensor(cont, dtype=torch.long)
            greedy = bool((tail.argmax(dim=-1) == target).all())
            res.append((float(tail.gather(1, target[:, None]).sum()), greedy))
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        raise NotImplementedError("generation tasks are not supported by the in-memory adapter; "
                                  "evaluate the HF export with --hf instead")
