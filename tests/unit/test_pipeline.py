"""The pipeline table (workers/pipeline.py) is what the tasks and the reconciler run by."""

from __future__ import annotations

from service import queue
from service.domain.states import ACTIVE, PHASE_OF_STATE, JobState
from workers import pipeline, tasks


def test_every_active_state_has_exactly_one_step_in_its_phase() -> None:
    assert set(pipeline.PIPELINE) == set(ACTIVE)
    for state, step in pipeline.PIPELINE.items():
        assert step.state is state
        assert step.phase is PHASE_OF_STATE[state]
        assert 0 < step.soft_time_limit < step.time_limit


def test_only_the_long_steps_hold_a_lease() -> None:
    leased = {s for s, step in pipeline.PIPELINE.items() if step.leased}
    assert leased == {JobState.PROVISIONING, JobState.EXPORTING}


def test_the_registered_tasks_run_with_the_tables_limits() -> None:
    registered = {
        t.name: t
        for t in (
            tasks.allocate_task,
            tasks.provision_task,
            tasks.poll_task,
            tasks.export_task,
            tasks.teardown_task,
            tasks.cancel_task,
            tasks.reconcile_task,
        )
    }
    for step in pipeline.PIPELINE.values():
        task = registered[step.task]
        assert (task.time_limit, task.soft_time_limit) == (step.time_limit, step.soft_time_limit)
    for name in (queue.TEARDOWN, queue.RECONCILE):
        assert (registered[name].time_limit, registered[name].soft_time_limit) == (
            pipeline.limits(name)
        )
    assert pipeline.next_task(JobState.EXPORTING) == queue.EXPORT


def test_backends_say_what_they_can_instead_of_being_named() -> None:
    from service.backends import registry
    from service.backends.compute.openstack import OpenStackBackend
    from service.backends.compute.sandbox import SandboxBackend
    from service.backends.interfaces import HostKeySource
    from workers.steps import provision

    assert SandboxBackend.capabilities.host_key_source is HostKeySource.RECORD
    assert OpenStackBackend.capabilities.host_key_source is HostKeySource.CONSOLE
    assert registry.capabilities("openstack").runtimes_dir == "/opt/stackml/runtimes"
    assert registry.capabilities("sandbox").runtimes_dir is None
    assert provision.runtime_on_server("openstack", "tf") == "/opt/stackml/runtimes/tf"
