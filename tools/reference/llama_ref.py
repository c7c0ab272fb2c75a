"""Independent reference for tollgate's engine: a plain numpy Llama forward pass over a
GGUF file (weights dequantized by the `gguf` package), the HF `tokenizers` library
configured like SmolLM2's tokenizer.json, and jinja2 for the chat template.

Usage: python llama_ref.py MODEL.gguf CASES.json > OUT.json
CASES.json: [{"prompt": "...", "chat": false, "n": 16}, ...]
OUT: [{"text": rendered prompt, "prompt_ids": [...], "greedy": [...], "last_logits": [...]}]
"last_logits" are the logits after the prompt (for the logits comparison).
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key):
    f = r.fields[key]
    if len(f.data) == 1 and f.types[0].name != "ARRAY":
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0].name == "STRING" else v[0]
    return [bytes(f.parts[i]).decode() if f.types[-1].name == "STRING" else f.parts[i][0] for i in f.data]


class Model:
    def __init__(self, path):
        r = GGUFReader(path)
        a = field(r, "general.architecture")
        # Qwen2: Llama with biases on Q, K and V, and RoPE over each head's halves (NEOX).
        # Qwen3: NEOX's RoPE, no biases, each Q and K head RMS-normed before it.
        # Phi-3: NEOX's RoPE, Q, K and V in one matrix, the gate and up projections in one
        # (Hugging Face's qkv_proj and gate_up_proj: the gate's rows first).
        self.neox = a in ("qwen2", "qwen3", "phi3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3")
        # Gemma (Hugging Face's GemmaForCausalLM and its 2 and 3): NEOX's RoPE, the embeddings
        # times sqrt(hidden) (the normalizer), GELU's tanh form on the gate; Gemma 2 and 3 norm
        # each block's output before the residual add, window some layers' attention
        # (Gemma 2 every even layer, Gemma 3 five of six, on rope_local_base_freq 10,000),
        # and Gemma 2 soft-caps the scores and the logits. (GGUF's norm weights already
        # hold Gemma's 1 + w.)
        self.gemma = a.startswith("gemma")
        # SmolLM3 (Hugging Face's no_rope_layers, llama.cpp's n_no_rope_layer_step 4): every
        # fourth layer (3, 7, ...) applies no rotary embedding, so neither YaRN's attention
        # factor, which scales the rotated q and k.
        self.no_rope_period = 4 if a == "smollm3" else 0
        get = lambda k, d=None: field(r, f"{a}.{k}") if f"{a}.{k}" in r.fields else d
        # Another file's window (Phi-3-mini-4k's, Mistral's), where shorter than its
        # context: every layer's (Hugging Face's Phi3Attention, MistralAttention).
        self.window = int(get("attention.sliding_window", 0)) if a != "gemma" else 0
        if a not in ("gemma2", "gemma3") and self.window >= int(get("context_length", 0)):
            self.window = 0
        self.period = {"gemma2": 2, "gemma3": 6}.get(a, 0)
        self.local_base = 10000.0 if a == "gemma3" else None
        self.attn_cap = get("attn_logit_softcapping")
        self.final_cap = get("final_logit_softcapping")
        # Mixtures of experts (Hugging Face's Qwen3MoeSparseMoeBlock, Qwen2MoeSparseMoeBlock):
        # a softmax over every expert's router score, the top k, their weights
        # renormalized (Qwen3-MoE's norm_topk_prob; Qwen2-MoE's are not), and Qwen2-MoE's
        # shared expert behind a sigmoid gate.
        ek = f"{a}.expert_used_count"
        self.n_used = int(field(r, ek)) if ek in r.fields else 0
        self.norm_topk = a != "qwen2moe"
        self.n_layers = int(field(r, f"{a}.block_count"))
        self.dim = int(field(r, f"{a}.embedding_length"))
        self.n_heads = int(field(r, f"{a}.attention.head_count"))
        self.n_kv = int(field(r, f"{a}.attention.head_count_kv"))
        self.eps = float(field(r, f"{a}.attention.layer_norm_rms_epsilon"))
        self.base = float(field(r, f"{a}.rope.freq_base"))
        self.freq_scale = 1.0
        self.yarn = None
        kind = field(r, f"{a}.rope.scaling.type") if f"{a}.rope.scaling.type" in r.fields else None
        if kind == "linear":
            self.freq_scale = 1.0 / float(field(r, f"{a}.rope.scaling.factor"))
        elif kind == "yarn":
            self.yarn = (float(field(r, f"{a}.rope.scaling.factor")),
                         int(field(r, f"{a}.rope.scaling.original_context_length")))
        # A head's width: the file's key_length where it has one (Qwen3's), else dim / heads.
        # Phi-3's LongRoPE: Hugging Face's _compute_longrope_parameters, its long factors
        # past the original context (here the file's context decides, as llama.cpp's
        # does), and the rotated q and k scaled by its attention factor.
        self.long_rope = None
        if any(t.name == "rope_factors_long.weight" for t in r.tensors):
            import math
            orig = int(field(r, f"{a}.rope.scaling.original_context_length"))
            ctx = int(field(r, f"{a}.context_length"))
            key = f"{a}.rope.scaling.attn_factor"
            if key in r.fields:
                attn = float(field(r, key))
            else:
                attn = math.sqrt(1 + math.log(ctx / orig) / math.log(orig)) if ctx > orig else 1.0
            self.long_rope = ("rope_factors_long.weight" if ctx > orig else "rope_factors_short.weight", attn)
        kl = f"{a}.attention.key_length"
        self.hd = int(field(r, kl)) if kl in r.fields else self.dim // self.n_heads
        # Partial RoPE (Hugging Face's partial_rotary_factor: Phi-4-mini's 96 of 128): the
        # first n_rot dimensions of each head turn, the rest pass as they are.
        rk = f"{a}.rope.dimension_count"
        self.n_rot = int(field(r, rk)) if rk in r.fields else self.hd
        self.w = {}
        for t in r.tensors:
            shape = [int(x) for x in reversed(t.shape)]
            self.w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])
        self.tokens = field(r, "tokenizer.ggml.tokens")
        self.types = field(r, "tokenizer.ggml.token_type")
        self.merges = field(r, "tokenizer.ggml.merges")
        self.template = field(r, "tokenizer.chat_template") if "tokenizer.chat_template" in r.fields else None

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def windowed(self, i):
        return self.window > 0 and (self.period == 0 or i % self.period < self.period - 1)

    def rope(self, x, pos, local=False):
        # x: [T, heads, hd]; its first n_rot dimensions turn (Hugging Face's q_rot, the rest
        # its q_pass): adjacent pairs (2i, 2i+1), GGUF's Llama layout, or halves
        # (i, i + n_rot/2) for NEOX's (Hugging Face's `rotate_half`).
        rot = self.n_rot
        if local:
            # Gemma 3's windowed layers: their own base, no scaling.
            inv = 1.0 / self.local_base ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
            ang = pos[:, None].astype(np.float64) * inv[None, :]
            c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
            half = rot // 2
            a, b = x[..., :half], x[..., half:rot]
            out = x.copy()
            out[..., :half] = a * c - b * s
            out[..., half:rot] = a * s + b * c
            return out
        inv = 1.0 / self.base ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
        # Llama 3.1's scaling: each pair's frequency over its factor (`rope_freqs.weight`),
        # as Hugging Face's `_compute_llama3_parameters` gives them; and linear scaling.
        if "rope_freqs.weight" in self.w:
            inv = inv / self.w["rope_freqs.weight"].reshape(-1).astype(np.float64)
        inv = inv * self.freq_scale
        mscale = 1.0
        if self.long_rope:
            name, mscale = self.long_rope
            inv = inv / self.w[name].reshape(-1).astype(np.float64)
        if self.yarn:
            # Hugging Face's _compute_yarn_parameters (beta_fast 32, beta_slow 1): each pair
            # between its interpolated and its own frequency along a linear ramp, and the
            # rotated q and k scaled by its attention factor.
            import math
            factor, orig = self.yarn
            corr = lambda turns: (rot * math.log(orig / (turns * 2 * math.pi))) / (2 * math.log(self.base))
            low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), rot - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(rot // 2, dtype=np.float64) - low) / (high - low), 0, 1)
            extra = 1 - ramp
            inv = (inv / factor) * (1 - extra) + inv * extra
            mscale = 0.1 * math.log(factor) + 1.0
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        c, s = np.cos(ang)[:, None, :] * mscale, np.sin(ang)[:, None, :] * mscale
        half = rot // 2
        first, second = (slice(0, half), slice(half, rot)) if self.neox else (slice(0, rot, 2), slice(1, rot, 2))
        a, b = x[..., first], x[..., second]
        out = x.copy()
        out[..., first] = a * c - b * s
        out[..., second] = a * s + b * c
        return out

    def proj(self, h, name):
        y = h @ self.w[name + ".weight"].T
        return y + self.w[name + ".bias"] if name + ".bias" in self.w else y

    def forward(self, ids):
        T = len(ids)
        x = self.w["token_embd.weight"][ids]
        if self.gemma:
            x = x * np.float32(np.sqrt(self.dim))
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        # A windowed layer's query at t sees keys t - window < s <= t.
        wmask = mask + np.tril(np.full((T, T), -np.inf, dtype=np.float32), -self.window) if self.window else mask
        g = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self.rms(x, self.w[p + "attn_norm.weight"])
            if p + "attn_qkv.weight" in self.w:
                qkv = self.proj(h, p + "attn_qkv")
                nq, nkv = self.n_heads * self.hd, self.n_kv * self.hd
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
            else:
                q, k, v = (self.proj(h, p + x) for x in ("attn_q", "attn_k", "attn_v"))
            q = q.reshape(T, self.n_heads, self.hd)
            k = k.reshape(T, self.n_kv, self.hd)
            v = v.reshape(T, self.n_kv, self.hd)
            if p + "attn_q_norm.weight" in self.w:
                # Hugging Face's Qwen3Attention: q_norm and k_norm over each head, before RoPE.
                q, k = self.rms(q, self.w[p + "attn_q_norm.weight"]), self.rms(k, self.w[p + "attn_k_norm.weight"])
            local = self.windowed(i) and self.local_base is not None
            if not (self.no_rope_period and (i + 1) % self.no_rope_period == 0):
                q, k = self.rope(q, pos, local), self.rope(k, pos, local)
            k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
            att = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.hd)
            if self.attn_cap:
                att = self.attn_cap * np.tanh(att / self.attn_cap)
            att = att + (wmask if self.windowed(i) else mask)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, v).reshape(T, self.n_heads * self.hd)
            o = o @ self.w[p + "attn_output.weight"].T
            if p + "post_attention_norm.weight" in self.w:
                o = self.rms(o, self.w[p + "post_attention_norm.weight"])
            x = x + o
            h = self.rms(x, self.w[p + "ffn_norm.weight"])
            if p + "ffn_gate_inp.weight" in self.w:
                x = x + self.moe(h, p)
                continue
            if p + "ffn_gate.weight" in self.w:
                gt = h @ self.w[p + "ffn_gate.weight"].T
                up = h @ self.w[p + "ffn_up.weight"].T
            else:
                gt, up = np.split(h @ self.w[p + "ffn_up.weight"].T, 2, axis=-1)
            if self.gemma:
                act = 0.5 * gt * (1 + np.tanh(np.sqrt(2 / np.pi) * (gt + 0.044715 * gt ** 3)))
            else:
                act = gt / (1 + np.exp(-gt))
            f = (act * up) @ self.w[p + "ffn_down.weight"].T
            if p + "post_ffw_norm.weight" in self.w:
                f = self.rms(f, self.w[p + "post_ffw_norm.weight"])
            x = x + f
        logits = self.rms(x[-1], self.w["output_norm.weight"]) @ self.out.T
        if self.final_cap:
            logits = self.final_cap * np.tanh(logits / self.final_cap)
        return logits


    def moe(self, h, p):
        w = self.w
        logits = h @ w[p + "ffn_gate_inp.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :self.n_used]
        silu = lambda g: g / (1 + np.exp(-g))
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            ws = probs[t, order[t]]
            if self.norm_topk:
                ws = ws / ws.sum()
            for e, wt in zip(order[t], ws):
                g = h[t] @ w[p + "ffn_gate_exps.weight"][e].T
                u = h[t] @ w[p + "ffn_up_exps.weight"][e].T
                out[t] += wt * ((silu(g) * u) @ w[p + "ffn_down_exps.weight"][e].T)
        if p + "ffn_gate_inp_shexp.weight" in w:
            sg = 1 / (1 + np.exp(-(h @ w[p + "ffn_gate_inp_shexp.weight"].reshape(-1))))
            g = h @ w[p + "ffn_gate_shexp.weight"].T
            u = h @ w[p + "ffn_up_shexp.weight"].T
            out += sg[:, None] * ((silu(g) * u) @ w[p + "ffn_down_shexp.weight"].T)
        return out


def tokenizer(m):
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(m.tokens)}
    merges = [tuple(x.split(" ", 1)) for x in m.merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(m.tokens, m.types) if ty in (3, 4)])
    return tk


def main():
    m = Model(sys.argv[1])
    cases = json.load(open(sys.argv[2]))
    tk = tokenizer(m)
    out = []
    for c in cases:
        text = c["prompt"]
        if c.get("chat"):
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # As Hugging Face's apply_chat_template renders it.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(m.template).render(
                messages=[{"role": "user", "content": text}], add_generation_prompt=True
            )
        ids = tk.encode(text, add_special_tokens=False).ids
        seq = list(ids)
        greedy, last = [], None
        for step in range(c.get("n", 16)):
            logits = m.forward(np.array(seq))
            if step == 0:
                last = logits
            t = int(np.argmax(logits))
            greedy.append(t)
            seq.append(t)
        out.append({"text": text, "prompt_ids": ids, "greedy": greedy, "last_logits": [float(v) for v in last]})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
