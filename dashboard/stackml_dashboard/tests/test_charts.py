from __future__ import annotations

import unittest

from stackml_dashboard import charts


class ChartTests(unittest.TestCase):
    def test_points_go_by_epoch_and_scale_into_the_box(self) -> None:
        svg = charts.svg_chart(
            "loss",
            [
                {"value": 0.2, "epoch": 3, "step": None},
                {"value": 1.0, "epoch": 1, "step": None},
                {"value": 0.5, "epoch": 2, "step": None},
            ],
        )
        self.assertTrue(svg.startswith('<svg class="stackml-chart" data-metric="loss"'))
        self.assertIn("loss by epoch", svg)
        pts = svg.split('points="')[1].split('"')[0].split()
        xs = [float(p.split(",")[0]) for p in pts]
        ys = [float(p.split(",")[1]) for p in pts]
        self.assertEqual(xs, sorted(xs))
        self.assertEqual((xs[0], xs[-1]), (charts.LEFT, charts.WIDTH - charts.RIGHT))
        self.assertEqual(ys[0], charts.TOP)  # the highest value at the top
        self.assertEqual(ys[-1], charts.HEIGHT - charts.BOTTOM)

    def test_one_point_and_no_points(self) -> None:
        one = charts.svg_chart("acc", [{"value": 0.5, "epoch": None, "step": None}])
        self.assertIn("acc by point", one)
        self.assertEqual(one.count("<circle"), 1)
        self.assertIn("no points", charts.svg_chart("x", []))

    def test_names_are_escaped(self) -> None:
        svg = charts.svg_chart('"><script>', [{"value": 1, "epoch": 1, "step": None}])
        self.assertNotIn("<script>", svg)
        self.assertIn("&lt;script&gt;", svg)
