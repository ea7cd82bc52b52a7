"""Reference outputs of golden/tiny-model computed by Hugging Face transformers, an implementation
independent of ours: the parity tests check our forward pass (with and without the KV cache) against
this file, so they run even where transformers is not installed.

    python golden/make_reference.py    # needs transformers; rewrites golden/reference.json

The file holds the input ids (two rows of 24 tokens), the logits (2, 24, 97) and every hidden state
(3 of them, each (2, 24, 16): the embeddings, the residual stream after block 0, and after ln_f),
rounded to 7 significant digits.
"""
import json
import os

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(HERE, "tiny-model"), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)

    def rounded(t):
        return [[[float(f"{x:.7g}") for x in row] for row in batch] for batch in t.tolist()]
    reference = dict(transformers=transformers.__version__, torch=torch.__version__, input_ids=ids.tolist(),
                     logits=rounded(out.logits), hidden_states=[rounded(h) for h in out.hidden_states])
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(reference, f)


if __name__ == "__main__":
    main()
