"""steps_per_execution="auto" and exact cadences."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import Trainer
from trainer.blocks import BlockSizer, FlatCall, flat_call
from trainer.cadence import steps_to_boundary

LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def test_auto_grows_blocks_and_gives_bit_identical_results_to_one_step_per_call():
    data = helpers.example1_data(32 * 120)
    model = helpers.example1()
    twin = helpers.clone(model)
    one = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=LOSSES)
    auto = Trainer(twin, optimizer=keras.optimizers.SGD(0.05), loss=LOSSES, steps_per_execution="auto")
    h1 = one.fit(data, batch_size=32, epochs=2, shuffle=False, progress=False).history
    h2 = auto.fit(data, batch_size=32, epochs=2, shuffle=False, progress=False).history
    assert h1 == h2
    for a, b in zip(helpers.weights(model), helpers.weights(twin)):
        np.testing.assert_array_equal(a, b)
    assert auto.runner.block_sizes["train"] > 4  # ~1 ms steps: it doubled well past a handful
    assert auto.trace_counts["train"] == 1


def test_block_sizer_doubles_after_fast_full_blocks_and_respects_limits():
    sizer = BlockSizer("auto", target_seconds=0.05)
    sizer.observe(1, 1, 2.0)  # the first call traces: ignored
    assert sizer.size == 1
    for _ in range(3):
        sizer.observe(sizer.size, sizer.size, 0.001)
    assert sizer.size == 8
    sizer.observe(8, 5, 0.001)  # the data ended inside the block: no information
    sizer.observe(8, 8, 0.04)  # slow enough: stays
    assert sizer.size == 8
    assert sizer.next(3, None) == 3 and sizer.next(None, 20) == 8
    fixed = BlockSizer(4)
    fixed.observe(4, 4, 0.0001)
    assert fixed.size == 4


def test_steps_to_boundary():
    assert steps_to_boundary(0, [4, 50]) == 4
    assert steps_to_boundary(4, [4, 50]) == 4
    assert steps_to_boundary(49, [4, 50]) == 1
    assert steps_to_boundary(7, []) is None


@pytest.mark.parametrize("nan_policy", ["raise", "skip"])
def test_the_update_is_outside_any_tf_cond_in_the_default_training_loop(nan_policy):
    """Speed pinned as structure (the speed itself is measured in scripts/bench.py): a tf.cond around the update
    costs a Switch for every tensor it reads, 9-18 % of a small step. The default loop applies each step at the top
    of the next iteration, SGD's update ops in the loop's body itself; with nan_policy="skip" a bad step's update
    must be skipped while the block goes on, so it stays in a tf.cond."""
    x, y = helpers.example1_data(64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    trainer = Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(0.05), loss=LOSSES, nan_policy=nan_policy)
    trainer.fit(data, steps_per_epoch=4, progress=False)
    count = tf.constant(1)
    block = trainer.runner.steps.blocks["train", True, False].get_concrete_function(
        trainer.runner.distribute(data), count, count
    )
    library = {f.signature.name: f for f in block.graph.as_graph_def().library.function}
    bodies = [f for name, f in library.items() if name.startswith("while_body")]
    assert len(bodies) == 1
    ops = _ops_through_calls(bodies[0], library)
    assert ("AssignSubVariableOp" in ops) == (nan_policy == "raise")
    assert bool(ops & {"If", "StatelessIf"}) == (nan_policy == "skip")


def _ops_through_calls(function, library) -> set[str]:
    """The op types of a graph function and of the functions it calls (not of a tf.cond's branches)."""
    ops = set()
    for node in function.node_def:
        ops.add(node.op)
        if node.op in ("PartitionedCall", "StatefulPartitionedCall"):
            ops |= _ops_through_calls(library[node.attr["f"].func.name], library)
    return ops


class _Counting:
    """A compiled block that counts ``get_concrete_function`` calls (the per-call argument match)."""

    def __init__(self, block) -> None:
        self.block, self.matched = block, 0

    def get_concrete_function(self, *args):
        self.matched += 1
        return self.block.get_concrete_function(*args)


def test_an_epoch_reuses_its_blocks_concrete_function_for_the_same_kind_of_iterator():
    """Matching an iterator to the block's trace cost ~0.4 ms at every epoch (3 % of a short epoch at 32 steps per
    call, measured side by side): it is done once per kind of iterator; another element structure is matched."""
    x, y = helpers.example1_data(96)
    trainer = Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(0.05), loss=LOSSES, steps_per_execution=4)
    trainer.fit(x, y, batch_size=32, epochs=1, progress=False)
    steps = trainer.runner.steps
    counting = {key: _Counting(block) for key, block in steps.blocks.items()}
    steps.blocks.update(counting)
    trainer.fit(x, y, batch_size=32, epochs=4, progress=False)
    again = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)  # a new dataset, the same element structure
    trainer.fit(again, epochs=5, initial_epoch=4, progress=False)
    assert sum(c.matched for c in counting.values()) == 0
    static = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)  # batches of a known size
    trainer.fit(static, epochs=6, initial_epoch=5, progress=False)
    assert sum(c.matched for c in counting.values()) == 1


def _graph_ops(concrete) -> set[str]:
    graph = concrete.graph.as_graph_def()
    return {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


@pytest.mark.parametrize("nan_policy, known", [("raise", True), ("raise", False), ("skip", True)])
def test_one_step_per_call_runs_blocks_without_a_loop_and_the_numbers_of_longer_blocks(nan_policy, known):
    """At steps_per_execution=1 a block is one step without a tf.while_loop (its control-flow ops cost ~10 % of a
    small step, measured side by side: scripts/bench.py); the variant with a loop is never traced. Histories
    (validation and skipped steps included) and weights are bit-identical to blocks of 3 steps."""
    x, y = helpers.example1_data(70)  # 5 batches of 16, the last one of 6
    if nan_policy == "skip":
        x[20] = np.nan  # the second batch's step is skipped
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    if not known:
        data = data.filter(lambda *_: True)  # cardinality unknown: the loop that checks for the data's end
    model = helpers.example1()
    twin = helpers.clone(model)
    runs = []
    for net, steps in ((model, 1), (twin, 3)):
        trainer = Trainer(net, optimizer=keras.optimizers.SGD(0.05), loss=LOSSES, steps_per_execution=steps,
                          nan_policy=nan_policy)  # fmt: skip
        history = trainer.fit(data, epochs=2, validation_data=data.skip(2), progress=False).history
        runs.append((trainer, history))
    (one, h1), (three, h3) = runs
    assert h1 == h3
    assert h1.get("skipped_steps", [1.0, 1.0]) == [1.0, 1.0]
    for a, b in zip(helpers.weights(model), helpers.weights(twin), strict=True):
        np.testing.assert_array_equal(a, b)
    for steps_per_call, trainer in ((1, one), (3, three)):
        traced = {key: block.experimental_get_tracing_count() for key, block in trainer.runner.steps.blocks.items()}
        used = {key for key, count in traced.items() if count}
        assert all(count <= 1 for count in traced.values())
        assert used == {("train", known, steps_per_call == 1), ("eval", known, steps_per_call == 1)}
        for mode, exact, single in used:
            iterator = trainer.runner.distribute(data)
            count = tf.constant(1)
            concrete = trainer.runner.steps.blocks[mode, exact, single].get_concrete_function(iterator, count, count)
            assert bool(_graph_ops(concrete) & {"While", "StatelessWhile"}) == (not single)


def test_a_training_block_traces_the_step_and_the_update_once():
    """The pipelined loop runs a step before its loop and in its body, an update in the body and after it; each is
    traced once (a nested function called at both places): tracing them twice was a fifth of a small VAE's first
    epoch. The eager first-batch check runs the loss once more, outside any graph."""
    traced = {"loss": 0, "update": 0}

    class CountingSGD(keras.optimizers.SGD):
        def apply(self, grads, trainable_variables=None):
            traced["update"] += tf.inside_function()
            return super().apply(grads, trainable_variables)

    def loss(outputs, targets):
        traced["loss"] += tf.inside_function()
        return tf.reduce_mean(tf.square(outputs["regression_output"] - targets["regression_output"]))

    x, y = helpers.example1_data(64)
    trainer = Trainer(helpers.example1(), optimizer=CountingSGD(0.05), loss=loss, steps_per_execution=4)
    trainer.fit(x, y, batch_size=16, epochs=2, progress=False)
    assert traced == {"loss": 1, "update": 1}
    assert trainer.trace_counts["train"] == 1


def test_blocks_and_predict_batches_are_called_with_flat_tensors_and_give_the_bound_calls_numbers(monkeypatch):
    """A concrete function's own call binds its arguments at every call (~0.4 ms, a third of a small model's epoch
    at one step per call, measured: scripts/bench.py): every block of an epoch and every batch of a predict call
    passes the iterator's flattened tensors instead. Histories, weights and predictions are bit-identical to the
    bound calls', and a call with another iterator falls back to the bound call."""
    x, y = helpers.example1_data(70)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    flat = []
    original = FlatCall.__call__

    def counting(self, iterator, *tensors):
        flat.append(iterator is self.iterator)
        return original(self, iterator, *tensors)

    model = helpers.example1()
    twin = helpers.clone(model)
    runs = []
    for net, bound in ((model, False), (twin, True)):
        flat.clear()
        if bound:  # the concrete functions' own calls
            monkeypatch.setattr("trainer.step.flat_call", lambda concrete, *_: concrete)
            monkeypatch.setattr("trainer.predict.flat_call", lambda concrete, *_: concrete)
        monkeypatch.setattr(FlatCall, "__call__", counting)
        trainer = Trainer(net, optimizer=keras.optimizers.SGD(0.05), loss=LOSSES, steps_per_execution=2)
        history = trainer.fit(data, epochs=2, validation_data=data, progress=False).history
        runs.append((history, trainer.predict(x, batch_size=16)))
        # 2 epochs x (3 training + 3 validation blocks), 5 predict batches (+1 that finds the end), then nothing
        assert flat == ([True] * 18 if not bound else [])
    (history, predicted), (twin_history, twin_predicted) = runs
    assert history == twin_history
    for a, b in zip(
        helpers.weights(model) + list(predicted.values()), helpers.weights(twin) + list(twin_predicted.values())
    ):
        np.testing.assert_array_equal(a, b)


def test_a_flat_call_with_another_iterator_or_other_inputs_is_the_bound_call():
    block = tf.function(lambda iterator, n: next(iterator) * tf.cast(n, tf.float32), autograph=False)
    data = tf.data.Dataset.from_tensor_slices(np.arange(4, dtype=np.float32))
    first, second = iter(data), iter(data)
    concrete = block.get_concrete_function(first, tf.constant(1))
    call = flat_call(concrete, first, tf.constant(1))
    assert isinstance(call, FlatCall)
    assert [float(call(first, tf.constant(2))), float(call(second, tf.constant(3)))] == [0.0, 0.0]
    assert float(call(first, tf.constant(2))) == 2.0  # first's second element, second's untouched by it
    assert float(call(second, tf.constant(1))) == 1.0
    assert flat_call(concrete, first, tf.constant(1.0)) is concrete  # a float where an int was traced


@pytest.mark.parametrize("form", ["while_loop", "written_out", "guarded"])
def test_the_benchs_hand_loops_do_the_trainers_work(form):
    """scripts/bench.py times three hand-written loops as the floor under the Trainer at 32 steps per call (a
    ``tf.while_loop``, the steps written out, the update under a ``tf.cond``): each must train the model as the
    Trainer does on the same data and order (40 steps: a block of 32, then one of 8)."""
    bench = helpers.script_module("bench")
    data = bench.two_head_data(32 * 40, 32)
    keras.utils.set_random_seed(0)
    trained = bench.two_head_model((64, 32))
    keras.utils.set_random_seed(0)
    by_hand = bench.two_head_model((64, 32))
    Trainer(trained, optimizer=keras.optimizers.Adam(1e-3), loss=LOSSES, steps_per_execution=32).fit(data, verbose=0)
    bench.hand_loop(by_hand, bench.keras_losses, data, 32, guard=form == "guarded", unrolled=form == "written_out")()
    for ours, theirs in zip(trained.trainable_variables, by_hand.trainable_variables, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-6)
