"""--pack: a packed row's examples do not attend to each other (block-diagonal mask, positions
restarting per example), so each example's logits equal those of the example run alone."""
import pytest
import torch

from lorafleet.errors import ConfigError
from lorafleet.models import load_model
from lorafleet.train import TrainConfig, train
from lorafleet.train.data import IGNORE_INDEX, Example, pack
from lorafleet.train.packing import block_causal_mask, segments
from lorafleet.train.trainer import forward_logits, logits_of, loss_sum

LENGTHS = [5, 9, 3, 7, 4]


def examples(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, list(ids)))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_logits_equal_each_example_alone(family, llama_dir, gpt2_dir):
    model = load_model(llama_dir if family == "llama" else gpt2_dir, dtype=torch.float32).eval()
    exs = examples(model.config.vocab_size)
    rows = pack(exs, max_len=16)
    assert [r.lengths for r in rows] == [[5, 9], [3, 7, 4]]
    with torch.no_grad():
        logits, labels = forward_logits(model, rows, pad_id=0, device=torch.device("cpu"))
        alone = [logits_of(model, torch.tensor([e.input_ids]))[0] for e in exs]
        i = 0
        for row, row_logits in zip(rows, logits):
            start = 0
            for n in row.lengths:
                torch.testing.assert_close(row_logits[start:start + n], alone[i],
                                           rtol=1e-4, atol=1e-4)
                start += n
                i += 1
        # and the loss: every example's next-token loss, nothing predicted across a boundary
        total = sum(loss_sum(a[None], torch.tensor([e.labels])).item() for a, e in zip(alone, exs))
        assert loss_sum(logits, labels).item() == pytest.approx(total, rel=1e-4)
        # the oracle can fail: plain causal attention over the same row differs
        plain = logits_of(model, torch.tensor([rows[0].input_ids]))[0]
        n0 = rows[0].lengths[0]
        assert not torch.allclose(plain[n0:n0 + rows[0].lengths[1]], alone[1], atol=1e-3)


def test_mask_and_positions():
    seg, pos = segments([[2, 3], [4]], width=6)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    mask = block_causal_mask(seg)[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]
    assert mask.diagonal().all()    # padding attends to itself: no all-masked row


def test_pack_keeps_examples_whole_and_drops_cross_boundary_labels():
    rows = pack([Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5]),
                 Example([6, 7, 8, 9], [6, 7, 8, 9])], max_len=6)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert rows[0].labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]


def test_pack_is_refused_where_the_mask_cannot_be_applied(tmp_path, llama_dir, toy_data):
    with pytest.raises(ConfigError, match="--pack"):
        train(TrainConfig.from_flat(model=str(llama_dir), data=str(toy_data), method="prompt",
                                    out=str(tmp_path / "o"), steps=1, pack=True))
