// qcard gallery: sorts and filters the cards table that the page already holds (rendered as HTML, with each
// row's raw values in data-* attributes). It reads text and attributes only and never writes markup, so a
// string from a card cannot become HTML here. Loaded as a file: the pages' CSP allows no inline script.
"use strict";

(function () {
  function rowsOf(table) {
    return Array.prototype.slice.call(table.tBodies[0].rows);
  }

  function applyFilters(table, form) {
    var selects = form.querySelectorAll("select[data-filter]");
    var shown = 0;
    var rows = rowsOf(table);
    rows.forEach(function (row) {
      var keep = true;
      selects.forEach(function (s) {
        if (s.value !== "" && row.getAttribute("data-" + s.getAttribute("data-filter")) !== s.value) {
          keep = false;
        }
      });
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    var count = document.getElementById("count");
    if (count) { count.textContent = shown + " of " + rows.length + " cards shown"; }
  }

  function compareValues(a, b, numeric) {
    if (numeric) {
      // cards without the value (failed, not measured) go last whichever the direction
      var x = a === "" ? NaN : parseFloat(a), y = b === "" ? NaN : parseFloat(b);
      if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
      return x - y;
    }
    return a.localeCompare(b, undefined, { numeric: true });
  }

  function sortBy(table, button) {
    var th = button.parentNode;
    var key = button.getAttribute("data-sort");
    var numeric = button.getAttribute("data-type") === "num";
    // a number column starts high to low (best top-1 first), a text column A to Z
    var dir = th.getAttribute("aria-sort") === (numeric ? "descending" : "ascending")
      ? (numeric ? "ascending" : "descending") : (numeric ? "descending" : "ascending");
    table.querySelectorAll("th[aria-sort]").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1;
    var rows = rowsOf(table);
    rows.sort(function (r1, r2) {
      var a = r1.getAttribute("data-" + key) || "", b = r2.getAttribute("data-" + key) || "";
      if (numeric && (a === "" || b === "")) { return compareValues(a, b, true); }
      return sign * compareValues(a, b, numeric);
    });
    var body = table.tBodies[0];
    rows.forEach(function (row) { body.appendChild(row); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.getElementById("cards");
    if (!table) { return; }
    table.querySelectorAll("th button[data-sort]").forEach(function (button) {
      button.addEventListener("click", function () { sortBy(table, button); });
    });
    var form = document.getElementById("filters");
    if (form) {
      form.addEventListener("change", function () { applyFilters(table, form); });
      form.addEventListener("submit", function (event) { event.preventDefault(); });
      applyFilters(table, form);
      // back to this page: the browser may restore the chosen values without a change event
      window.addEventListener("pageshow", function () { applyFilters(table, form); });
    }
  });
}());
