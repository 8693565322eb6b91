//! The denoising step (the ControlNets in their window, then the UNet) recorded as CUDA graphs
//! and replayed, one graph per step shape: the latents' and text's shapes and the active
//! ControlNets with their scales (scalars are baked into a recording). A step is then a few
//! input copies and one launch instead of ~3,000 kernel launches from the host.
//!
//! The graphs read fixed input buffers and write a fixed output: [`StepGraphs::predict`] copies
//! the step's inputs in, replays, and copies the prediction out. Weights are read in place, so
//! fusing LoRAs (which writes into the same weight tensors) needs no re-recording; unloading a
//! ControlNet drops the graphs that use it ([`StepGraphs::forget_controlnet`]). All graphs of a
//! pipeline share one memory pool: they run one after another on one stream.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use tch::Tensor;

use crate::Result;
use crate::cuda::{CudaGraph, MemoryPool, empty_cache};
use crate::pipeline::{ActiveControl, ControlNetId, StepInputs};
use crate::unet::Timestep;

/// What a recording depends on besides the input buffers' contents.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StepKey {
    sample: Vec<i64>,
    hidden: Vec<i64>,
    controls: Vec<(ControlNetId, u64, Vec<i64>)>,
}

impl StepKey {
    fn of(inputs: &StepInputs<'_>, controls: &[ActiveControl<'_>]) -> StepKey {
        StepKey {
            sample: inputs.sample.size(),
            hidden: inputs.hidden.size(),
            controls: controls
                .iter()
                .map(|c| (c.id, c.scale.to_bits(), c.image.size()))
                .collect(),
        }
    }
}

/// The buffers of a dropped recording that models may have remembered something of: the text
/// states (cross-attention keys and values) and each ControlNet's control image (its
/// conditioning embedding).
pub(crate) struct GraphBuffers {
    pub(crate) hidden: Tensor,
    pub(crate) images: Vec<(ControlNetId, Tensor)>,
}

/// One recording and the buffers it reads and writes.
struct StepGraph {
    graph: CudaGraph,
    sample: Tensor,
    timestep: Tensor,
    hidden: Tensor,
    pooled: Tensor,
    time_ids: Tensor,
    /// The control images, one per ControlNet of the key, in its order.
    images: Vec<Tensor>,
    output: Tensor,
    /// The generation whose conditioning (text, control images) the buffers hold.
    generation: u64,
}

/// The step graphs of one pipeline on one CUDA device.
pub(crate) struct StepGraphs {
    device: usize,
    graphs: HashMap<StepKey, StepGraph>,
    pool: Option<MemoryPool>,
    generation: u64,
}

impl StepGraphs {
    /// No graphs yet, for CUDA device `device`.
    pub fn new(device: usize) -> StepGraphs {
        StepGraphs {
            device,
            graphs: HashMap::new(),
            pool: None,
            generation: 0,
        }
    }

    /// Marks the start of a generation: its conditioning is copied into each graph's buffers
    /// the first time the generation uses that graph.
    pub fn begin_generation(&mut self) {
        self.generation += 1;
    }

    /// Drops every graph that runs ControlNet `id` (before the ControlNet's weights are freed).
    /// Returns their buffers, for the models to forget what they remembered of them.
    pub fn forget_controlnet(&mut self, id: ControlNetId) -> Vec<GraphBuffers> {
        let dropped: Vec<GraphBuffers> = self
            .graphs
            .extract_if(|key, _| key.controls.iter().any(|(control, _, _)| *control == id))
            .map(|(key, graph)| graph.into_buffers(&key))
            .collect();
        if self.graphs.is_empty() {
            self.pool = None;
        }
        dropped
    }

    /// Drops every graph; returns their buffers, for the models to forget what they remembered
    /// of them.
    pub fn into_buffers(self) -> Vec<GraphBuffers> {
        self.graphs
            .into_iter()
            .map(|(key, graph)| graph.into_buffers(&key))
            .collect()
    }

    /// `run(inputs, controls)` through the graph of this step's shape, recorded on first use.
    /// `inputs.timestep` must be a device tensor. Returns a fresh tensor (not the graph's
    /// output buffer, which the next replay overwrites).
    ///
    /// `remember(hidden, controls)` has the models compute what they keep of the graph's own
    /// buffers — the text states' cross-attention keys and values, each control image's
    /// conditioning embedding (`controls` then carry the graph's image buffers): called before
    /// the graph is recorded and each time a generation puts new conditioning in them, so a
    /// replay reads what was computed outside the graph, once per generation.
    pub fn predict(
        &mut self,
        inputs: &StepInputs<'_>,
        controls: &[ActiveControl<'_>],
        run: &dyn Fn(&StepInputs<'_>, &[ActiveControl<'_>]) -> Result<Tensor>,
        remember: &dyn Fn(&Tensor, &[ActiveControl<'_>]),
    ) -> Result<Tensor> {
        let Timestep::Tensor(timestep) = inputs.timestep else {
            return Err(crate::EngineError::InvalidInput {
                component: "step graph",
                message: "graphs need the timestep as a device tensor".to_owned(),
            });
        };
        let key = StepKey::of(inputs, controls);
        let generation = self.generation;
        let graph = match self.graphs.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let graph = record(
                    self.device,
                    &mut self.pool,
                    generation,
                    inputs,
                    timestep,
                    controls,
                    run,
                    remember,
                )?;
                entry.insert(graph)
            }
        };
        if graph.generation != generation {
            graph.hidden.copy_(inputs.hidden);
            graph.pooled.copy_(inputs.pooled);
            graph.time_ids.copy_(inputs.time_ids);
            for (buffer, control) in graph.images.iter_mut().zip(controls) {
                buffer.copy_(control.image);
            }
            remember(&graph.hidden, &on_buffers(controls, &graph.images));
            graph.generation = generation;
        }
        graph.sample.copy_(inputs.sample);
        graph.timestep.copy_(timestep);
        graph.graph.replay()?;
        Ok(graph.output.copy())
    }
}

impl StepGraph {
    fn into_buffers(self, key: &StepKey) -> GraphBuffers {
        GraphBuffers {
            hidden: self.hidden,
            images: key
                .controls
                .iter()
                .map(|(id, _, _)| *id)
                .zip(self.images)
                .collect(),
        }
    }
}

/// `controls` reading the graph's image buffers instead of the caller's images.
fn on_buffers<'a>(controls: &[ActiveControl<'a>], images: &'a [Tensor]) -> Vec<ActiveControl<'a>> {
    controls
        .iter()
        .zip(images)
        .map(|(c, image)| ActiveControl {
            id: c.id,
            net: c.net,
            image,
            scale: c.scale,
        })
        .collect()
}

/// Records `run` on copies of the inputs (the graph's buffers) into `pool` (set to a new pool
/// on the first recording), after `remember` on the text buffer.
#[allow(clippy::too_many_arguments)]
fn record(
    device: usize,
    pool: &mut Option<MemoryPool>,
    generation: u64,
    inputs: &StepInputs<'_>,
    timestep: &Tensor,
    controls: &[ActiveControl<'_>],
    run: &dyn Fn(&StepInputs<'_>, &[ActiveControl<'_>]) -> Result<Tensor>,
    remember: &dyn Fn(&Tensor, &[ActiveControl<'_>]),
) -> Result<StepGraph> {
    let sample = inputs.sample.copy();
    let timestep = timestep.copy();
    let hidden = inputs.hidden.copy();
    let pooled = inputs.pooled.copy();
    let time_ids = inputs.time_ids.copy();
    let images: Vec<Tensor> = controls.iter().map(|c| c.image.copy()).collect();
    let fixed_controls = on_buffers(controls, &images);
    remember(&hidden, &fixed_controls);
    let (graph, output) = CudaGraph::capture(device, *pool, || {
        let fixed = StepInputs {
            sample: &sample,
            timestep: Timestep::Tensor(&timestep),
            hidden: &hidden,
            pooled: &pooled,
            time_ids: &time_ids,
        };
        run(&fixed, &fixed_controls)
    })?;
    if pool.is_none() {
        *pool = Some(graph.pool()?);
    }
    // The warm-up run's activations sit in the allocator's cache; the graph has its own.
    empty_cache()?;
    Ok(StepGraph {
        graph,
        sample,
        timestep,
        hidden,
        pooled,
        time_ids,
        images,
        output,
        generation,
    })
}
