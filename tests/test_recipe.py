"""Recipe: one definition of a method, names looked up case-insensitively, identity over all fields."""

import dataclasses

import pytest

from yaqa.recipe import Recipe, RecipeError, get_recipe, recipe_names, register_recipe


def test_names_and_aliases_are_case_insensitive():
    assert get_recipe("GPTQ") == get_recipe("ldlq")
    assert get_recipe("Yaqa") == get_recipe("yaqa-b")
    assert get_recipe("yaqa-A").hessian == "A" and get_recipe("rtn").hessian == "none"
    assert get_recipe("gptq").hessian == "hx"  # forward passes only
    with pytest.raises(RecipeError, match="unknown method 'awq'.*rtn"):
        get_recipe("awq")


def test_every_field_changes_the_identity_and_the_name_does_not():
    r = get_recipe("yaqa-b")
    other = {"rounding": "ldlq", "hessian": "A", "power_iters": 3, "quantizer": "int3",
             "group_size": 32, "symmetric": True, "scale_search": "mse", "incoherence": False,
             "block_size": 8, "sigma": 0.1, "seed": 1, "shrinkage": "off", "label_draws": 2,
             "refine": 4, "block_size_out": 4}
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    # fused_global_scale only matters (and only joins the identity) for nvfp4
    assert set(other) | {"fused_global_scale"} == fields  # a new field must be added here
    for k, v in other.items():
        assert r.replace(**{k: v}).identity_hash() != r.identity_hash(), k
    nv = r.replace(quantizer="nvfp4")
    assert nv.replace(fused_global_scale=False).identity_hash() != nv.identity_hash()
    assert r.replace(name="renamed").identity_hash() == r.identity_hash()


def test_impossible_recipes_are_refused_up_front():
    with pytest.raises(RecipeError, match="yaqa rounding needs Hessians"):
        get_recipe("yaqa-b", hessian="hx")
    with pytest.raises(RecipeError, match="got 5"):
        get_recipe("rtn", bits=5)
    with pytest.raises(RecipeError, match="unknown recipe fields"):
        get_recipe("rtn", groupsize=32)


def test_refine_is_validated_recorded_and_reaches_only_ldlq_and_yaqa():
    assert get_recipe("yaqa-b", refine=8).refine == 8
    assert get_recipe("ldlq", refine=8).refine == 8
    assert get_recipe("rtn", refine=8).refine == 0  # one value for a run over several methods
    assert get_recipe("ldlq", refine=8).to_dict()["refine"] == 8  # what yaqa.json records
    assert "refine" not in get_recipe("ldlq").identity()  # earlier identities unchanged
    with pytest.raises(RecipeError, match="refine must be an integer >= 0"):
        get_recipe("ldlq", refine=-1)
    with pytest.raises(RecipeError, match="int-k quantizer"):
        get_recipe("yaqa-b", refine=2, quantizer="trellis2")
    with pytest.raises(RecipeError, match="not RTN"):
        get_recipe("rtn").replace(refine=2)


def test_power_iters_reaches_only_recipes_with_a_sketch():
    assert get_recipe("yaqa-b", power_iters=3).power_iters == 3
    assert get_recipe("yaqa-a", power_iters=3).power_iters == 3
    assert get_recipe("rtn", power_iters=3) == get_recipe("rtn")


def test_registering_a_recipe_makes_its_name_usable():
    register_recipe(Recipe("test-gptq3", "ldlq", "hx", quantizer="int3"), "TEST-G3")
    assert get_recipe("test-g3").quantizer == "int3"
    assert "test-gptq3" in recipe_names()


def test_identity_diff_names_a_field_left_at_its_default():
    # refine 0 is left out of the identity, so a stored refine-3 run differs by an absent key:
    # the message must say it is the default, not "None".
    from yaqa.store import diff_identity

    stored = get_recipe("yaqa-b", refine=3).identity()
    now = get_recipe("yaqa-b").identity()
    (line,) = diff_identity({"recipe": stored}, {"recipe": now})
    assert line == "recipe.refine: stored 3, now absent (the default)"


def test_block_size_out_is_yaqa_only_and_square_tiles_keep_their_identity():
    assert get_recipe("yaqa-b", block_size_out=16) == get_recipe("yaqa-b")  # = block_size
    assert "block_size_out" not in get_recipe("yaqa-b").identity()
    assert get_recipe("yaqa-b", block_size_out=2).identity()["block_size_out"] == 2
    with pytest.raises(RecipeError, match="ldlq rounding has no output feedback"):
        get_recipe("ldlq", block_size_out=2)
    for bad in (0, 2.5, True):
        with pytest.raises(RecipeError, match="block_size_out must be an integer >= 1"):
            get_recipe("yaqa-b", block_size_out=bad)


@pytest.mark.parametrize("method, quantizer, device, rounds", [
    ("yaqa-b", "int4", "cuda", 32), ("yaqa-a", "int3", "cuda:1", 32),
    ("yaqa-b", "int4", "cpu", 0), ("ldlq", "int4", "cuda", 0), ("rtn", "int4", "cuda", 0),
    ("yaqa-b", "trellis4", "cuda", 0), ("yaqa-b", "nvfp4", "cuda", 0)])
def test_default_refinement_follows_method_format_and_device(method, quantizer, device, rounds):
    import torch

    from yaqa.recipe import default_refine, with_default_refine

    r = get_recipe(method, quantizer=quantizer)
    assert default_refine(r, device) == rounds
    assert default_refine(r, torch.device(device)) == rounds
    if device == "cuda":  # an index means cuda:index to torch, and so here
        assert default_refine(r, 0) == rounds
    assert with_default_refine(r, None, device).refine == rounds
    for asked in (0, 5):  # asked for explicitly, the recipe is left as built
        assert with_default_refine(r, asked, device) is r


def test_auto_device_refines_where_cuda_is_available(monkeypatch):
    import torch

    from yaqa.recipe import default_refine

    r = get_recipe("yaqa-b")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_refine(r, "auto") == 32 and default_refine(r, None) == 32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_refine(r, "auto") == 0
