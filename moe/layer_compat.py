"""`MoELayer`'s attributes that read its components, under the names the
layer always had, and the layout of the `.keras` files earlier versions
wrote (before the routers and experts were components)."""


class _ExpertWeight:
    # The variable of the same name on the layer's `experts` (or, for a
    # `shared_expert_*` name, `shared_experts`) sublayer.
    def __set_name__(self, owner, name):
        self.name = name
        self.part = "shared_experts" if name.startswith("shared") else "experts"

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        variable = getattr(getattr(layer, self.part, None), self.name, None)
        if variable is None:
            raise AttributeError(
                f"{type(layer).__name__} has no {self.name!r} (not gated, "
                "no biases, no shared experts, or not built)"
            )
        return variable


class MoELayerCompat:
    """Mixin of `MoELayer`: attributes that read its components, under the
    names the layer always had (`layer.expert_in_kernel`,
    `layer.shared_expert_out_bias`, ... are the stacked variables of
    `layer.experts` / `layer.shared_experts`, `layer.gating_network` the
    router's), and the loading of files written when those were the layer's
    own."""

    expert_in_kernel = _ExpertWeight()
    expert_in_bias = _ExpertWeight()
    expert_gate_kernel = _ExpertWeight()
    expert_gate_bias = _ExpertWeight()
    expert_out_kernel = _ExpertWeight()
    expert_out_bias = _ExpertWeight()
    shared_expert_in_kernel = _ExpertWeight()
    shared_expert_in_bias = _ExpertWeight()
    shared_expert_gate_kernel = _ExpertWeight()
    shared_expert_gate_bias = _ExpertWeight()
    shared_expert_out_kernel = _ExpertWeight()
    shared_expert_out_bias = _ExpertWeight()

    @property
    def experts_per_input(self):
        """The `k` experts each input is routed to (at most)."""
        return self.router.experts_per_input

    @property
    def selection_bias(self):
        """The router's selection bias `(num_experts,)`, or `None`."""
        return getattr(self.router, "selection_bias", None)

    @property
    def gating_network(self):
        """The router's `GatingNetwork` (`None` without one, e.g. hash)."""
        # Saving visits this name before `router`, so a file keeps the
        # sublayer where earlier versions held it.
        return getattr(self.router, "gating_network", None)

    @property
    def group_gating_network(self):
        """`"hierarchical"`: the group router's `GatingNetwork`."""
        return self.router.group_gating_network

    @property
    def expert_weights(self):
        """The routed experts' stacked variables, in `expert_fn` order."""
        return self.experts.stacked_weights

    @property
    def shared_expert_weights(self):
        """The shared experts' stacked variables (`[]` without)."""
        shared = self.shared_experts
        return [] if shared is None else shared.stacked_weights

    def expert_fn(self, x, *params, affine=None):
        """The routed experts' maths (`moe.Experts.expert_fn`)."""
        return self.experts.expert_fn(x, *params, affine=affine)

    def load_own_variables(self, store):
        own = self._trainable_variables + self._non_trainable_variables
        legacy = [*self.experts.weights]
        if self.shared_experts is not None:
            legacy += self.shared_experts.weights
        if len(store.keys()) != len(own) + len(legacy) or not legacy:
            return super().load_own_variables(store)
        # Written before the experts were sublayers: their weights were the
        # layer's own, routed then shared, in build order.
        for i, variable in enumerate(legacy):
            variable.assign(store[str(i)])
        for part in (self.experts, self.shared_experts):
            if part is not None:
                part._loaded_by_parent = True
